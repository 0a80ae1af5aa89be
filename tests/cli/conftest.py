"""CLI tests: ``CliRunner`` against a real coordinator process, or real subprocesses."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from rma.cli.main import app


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


Invoke = Callable[..., Result]


@pytest.fixture
def rma(runner: CliRunner, coordinator_process: Any) -> Invoke:
    """``rma ARGS`` as the operator on the coordinator's machine (admin.key read from there)."""

    def invoke(*args: str, env: dict[str, str] | None = None) -> Result:
        full = {
            "RMA_COORDINATOR_URL": coordinator_process.url,
            "RMA_DATA_DIR": str(coordinator_process.data_dir),
            **(env or {}),
        }
        return runner.invoke(app, list(args), env=full)

    return invoke


def json_out(result: Result) -> Any:
    """The one JSON document on stdout (fails when stdout holds anything else)."""
    assert result.exit_code == 0, (result.stdout, result.stderr)
    return json.loads(result.stdout)


def assert_one_error(result: Result, *, json_mode: bool = False, code: str | None = None) -> str:
    """Exit 1, one ``error:`` line on stderr, no traceback; under --json the error on stdout."""
    assert result.exit_code == 1, (result.exit_code, result.stdout, result.stderr)
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    if json_mode:
        doc = json.loads(result.stdout)
        assert set(doc["error"]) >= {"code", "message"}
        if code is not None:
            assert doc["error"]["code"] == code
    else:
        assert result.stdout == ""
    return lines[0]
