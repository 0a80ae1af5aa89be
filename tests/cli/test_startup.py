"""``rma --help`` and the admin commands' import path stay light: no server stack."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("fastapi", "sqlmodel", "sqlalchemy", "uvicorn", "textual", "docker", "alembic", "jwt")


def test_cli_import_does_not_load_the_server_stack() -> None:
    code = (
        "import sys, rma.cli.main, rma.cli.admin, rma.client;"
        f"print(sorted(set({HEAVY!r}) & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_help_lists_the_groups() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "rma", "--help"], capture_output=True, text=True, check=True
    )
    for group in ("coordinator", "admin"):
        assert group in out.stdout
