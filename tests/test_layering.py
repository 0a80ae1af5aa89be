"""The house rules of DESIGN.md, checked: who may import whom, and what starts fast."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "rma"

#: package -> packages it must never import
FORBIDDEN = {
    "agent": ("rma.coordinator", "rma.tui", "rma.cli"),
    "coordinator": ("rma.agent", "rma.tui", "rma.cli"),
    "tui": ("rma.coordinator", "rma.agent"),
    "services": ("rma.coordinator", "rma.agent", "rma.tui", "rma.cli"),
    "tunnel": ("rma.coordinator", "rma.agent"),
    "schemas": ("rma.coordinator", "rma.agent", "rma.tui", "rma.cli", "rma.client"),
    "catalog": ("rma.coordinator", "rma.agent", "rma.tui", "rma.cli"),
}


def imports_of(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_import_rules(package: str) -> None:
    bad = []
    for path in sorted((SRC / package).rglob("*.py")):
        for name in imports_of(path):
            if any(name == f or name.startswith(f + ".") for f in FORBIDDEN[package]):
                bad.append(f"{path.relative_to(SRC)} imports {name}")
    assert not bad, "\n".join(bad)


HEAVY = (
    "fastapi",
    "starlette",
    "sqlmodel",
    "sqlalchemy",
    "uvicorn",
    "textual",
    "docker",
    "llama_cpp",
    "torch",
    "alembic",
)


@pytest.mark.parametrize(
    "argv",
    [["--help"], ["infer", "--help"], ["admin", "--help"], ["worker", "--help"], ["--version"]],
)
def test_fast_start(argv: list[str]) -> None:
    """`rma --help` and `rma infer` never load the server stack, the dashboard or a model."""
    code = (
        "import sys, runpy\n"
        f"sys.argv = ['rma', *{argv!r}]\n"
        "try:\n    runpy.run_module('rma', run_name='__main__')\n"
        "except SystemExit:\n    pass\n"
        f"heavy = sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})\n"
        "print('HEAVY', heavy, file=sys.stderr)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    line = next(ln for ln in proc.stderr.splitlines() if ln.startswith("HEAVY"))
    assert line == "HEAVY []", line
