"""The lock (requirements/lock.txt) stays in step with pyproject.toml.

CI installs exactly the lock (``-c requirements/lock.txt``, then ``.ci/check_lock.py``); these tests
catch, on any machine, a dependency added or re-ranged in pyproject.toml without ``nox -s lock``.
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements" / "lock.txt"


def _pins() -> dict[str, str]:
    sys.path.insert(0, str(ROOT / ".ci"))
    try:
        from check_lock import read_lock
    finally:
        sys.path.pop(0)
    return read_lock(LOCK)


def _requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    for extra, items in project["optional-dependencies"].items():
        reqs += [Requirement(r) for r in items if not r.startswith(project["name"] + "[")]
        assert extra  # every extra is a list of requirements
    return reqs


def test_every_dependency_is_pinned_inside_its_range() -> None:
    pins = _pins()
    problems = []
    for req in _requirements():
        name = canonicalize_name(req.name)
        if name not in pins:
            problems.append(f"{req} is not in the lock")
        elif not req.specifier.contains(pins[name], prereleases=True):
            problems.append(f"{req}: the lock pins {pins[name]}, outside the range")
    assert not problems, "run `nox -s lock`:\n" + "\n".join(problems)


def test_the_lock_pins_every_line_exactly() -> None:
    pins = _pins()
    assert len(pins) > 50  # every transitive dependency, not just the direct ones
    assert "llama-cpp-python" in pins  # the model tests depend on the locked build


def test_check_lock_flags_a_stray_package(tmp_path: Path) -> None:
    lock = tmp_path / "lock.txt"
    lock.write_text("pytest==0.0.1\n")  # this environment has another pytest, and more
    result = subprocess.run(
        [sys.executable, str(ROOT / ".ci" / "check_lock.py"), str(lock)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1
    assert "pytest==" in result.stdout and "pins 0.0.1" in result.stdout
    assert "is installed but not in" in result.stdout


@pytest.mark.parametrize("line", ["fastapi>=0.1", "-e ."])
def test_check_lock_refuses_a_loose_lock(tmp_path: Path, line: str) -> None:
    lock = tmp_path / "lock.txt"
    lock.write_text(line + "\n")
    result = subprocess.run(
        [sys.executable, str(ROOT / ".ci" / "check_lock.py"), str(lock)],
        capture_output=True,
        text=True,
    )
    if line.startswith("-"):
        assert result.returncode == 1  # options are skipped, so everything is "not in the lock"
    else:
        assert result.returncode != 0
        assert "not an exact pin" in (result.stdout + result.stderr)
