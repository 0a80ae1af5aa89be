"""Finding the system programs a service needs (catalog ``programs``).

PostgreSQL's server programs (``initdb``, ``postgres``, ``pg_dump``) are not on ``PATH`` on
Debian and Ubuntu: they live in ``/usr/lib/postgresql/<version>/bin``.  A program is looked up on
``PATH`` first, then in those directories (the newest version first), then in Homebrew's.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
from functools import cache

#: Where a distribution keeps programs that are not on PATH (newest version wins).
SEARCH_GLOBS = (
    "/usr/lib/postgresql/*/bin",
    "/usr/pgsql-*/bin",  # RPM-based distributions
    "/opt/homebrew/opt/postgresql*/bin",
    "/usr/local/opt/postgresql*/bin",
)


def _version_key(path: str) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", path)) or (0,)


def search_dirs() -> list[str]:
    """The extra directories, newest version first within each pattern."""
    out: list[str] = []
    for pattern in SEARCH_GLOBS:
        out += sorted(glob.glob(pattern), key=_version_key, reverse=True)
    return out


@cache
def find_program(name: str) -> str | None:
    """The full path of ``name``, or ``None`` when this machine does not have it."""
    found = shutil.which(name)
    if found:
        return found
    for directory in search_dirs():
        candidate = os.path.join(directory, name)
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def missing_programs(names: list[str]) -> list[str]:
    """Those of ``names`` this machine does not have."""
    return [n for n in names if find_program(n) is None]
