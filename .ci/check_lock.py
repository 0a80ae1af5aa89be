"""Fail when the environment differs from the lock: a changed lock is a reviewed change.

Usage: ``python .ci/check_lock.py requirements/lock.txt [requirements/no-deps.txt ...]`` (in the
venv that was installed with ``-c requirements/lock.txt``; later files add exact pins of packages
installed with ``--no-deps``).  Every installed distribution must be in the lock at exactly that
version; the project itself and the installers are exempt.  ``nox -s lock`` refreshes the lock.
"""

from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path

EXEMPT = {"rma", "rma-pool", "pip", "setuptools", "wheel"}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path: Path) -> dict[str, str]:
    pins: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        name, sep, version = line.partition("==")
        if not sep:
            raise SystemExit(f"{path}: not an exact pin: {raw!r}")
        pins[canonical(name.split("[", 1)[0])] = version.split(";", 1)[0].strip()
    return pins


def main() -> int:
    files = [Path(a) for a in sys.argv[1:]] or [Path("requirements/lock.txt")]
    lock = files[0]
    pins: dict[str, str] = {}
    for path in files:
        pins.update(read_lock(path))
    problems: list[str] = []
    for dist in metadata.distributions():
        name = canonical(dist.metadata["Name"])
        if name in EXEMPT:
            continue
        want = pins.get(name)
        have = dist.version
        if want is None:
            problems.append(f"{name}=={have} is installed but not in {lock}")
        elif have.split("+", 1)[0] != want.split("+", 1)[0]:
            problems.append(f"{name}=={have} is installed; {lock} pins {want}")
    if problems:
        print("error: the environment does not match the lock (refresh it: nox -s lock):")
        for p in sorted(problems):
            print("  " + p)
        return 1
    print(f"environment matches {lock} ({len(pins)} pins)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
