"""`rma worker detect`: hints print as written (rich markup does not eat `[gpu]`)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rma.cli.main import app
from rma.cli.output import fail, table


def test_detect_without_nvml_prints_the_whole_install_hint(tmp_path: Path) -> None:
    # A `pynvml` that cannot be imported: what a machine without the `gpu` extra has.
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "pynvml.py").write_text("raise ImportError('not installed')\n")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(shadow), os.environ.get("PYTHONPATH", "")]),
        "RMA_DATA_DIR": str(tmp_path / "data"),
        "COLUMNS": "200",
        "NO_COLOR": "1",
    }
    done = subprocess.run(
        [sys.executable, "-m", "rma", "worker", "detect"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "nvidia-ml-py is not installed (pip install 'rma-pool[gpu]')" in done.stdout


def test_table_cells_and_errors_are_text_not_markup(capsys) -> None:  # type: ignore[no-untyped-def]
    import typer

    table(None, ["hint"], [["pip install 'rma-pool[gpu]' [bold]x[/bold]"]])
    assert "pip install 'rma-pool[gpu]' [bold]x[/bold]" in capsys.readouterr().out
    with pytest.raises(typer.Exit):
        fail("missing [local] extra")
    assert capsys.readouterr().err.strip() == "error: missing [local] extra"


def test_no_flag_shows_a_bool_metavar_in_help() -> None:
    runner = CliRunner()
    for args in (["up", "--help"], ["infer", "--help"], ["worker", "join", "--help"]):
        result = runner.invoke(app, args, env={"COLUMNS": "200", "NO_COLOR": "1"})
        assert result.exit_code == 0, result.output
        assert "<bool>" not in result.output, (args, result.output)
        assert "BOOL" not in result.output, (args, result.output)
