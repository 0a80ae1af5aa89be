"""The agent's files: identity (0600), status, the one-agent-per-data-dir lock."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rma.agent.state import (
    AgentLock,
    Identity,
    StateError,
    agent_key,
    agent_running,
    load_identity,
    save_identity,
    save_status,
)
from rma.cli.main import app


def test_identity_round_trip_is_private(tmp_path: Path) -> None:
    data = tmp_path / "w"
    ident = Identity(worker_id="abc", worker_secret="s3cret", coordinator_url="http://x", name="n")
    path = save_identity(data, ident)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    assert load_identity(data) == ident
    assert [p.name for p in data.iterdir()] == ["worker.json"]  # no temp file left behind


def test_no_identity_yet(tmp_path: Path) -> None:
    assert load_identity(tmp_path) is None


def test_damaged_identity_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "worker.json").write_text("{not json")
    with pytest.raises(StateError, match="damaged; delete it"):
        load_identity(tmp_path)


def test_one_agent_per_data_dir(tmp_path: Path) -> None:
    first = AgentLock(tmp_path)
    first.acquire()
    try:
        with pytest.raises(StateError, match="another agent is running"):
            AgentLock(tmp_path).acquire()
        assert agent_running(tmp_path) is not None
    finally:
        first.release()
    assert agent_running(tmp_path) is None
    AgentLock(tmp_path).acquire()  # free again


def test_lock_dies_with_its_process(tmp_path: Path) -> None:
    """A killed agent (SIGKILL) holds no lock: the kernel drops it with the process."""
    code = (
        "import sys, time; from pathlib import Path; from rma.agent.state import AgentLock;"
        f"AgentLock(Path({str(tmp_path)!r})).acquire(); print('locked', flush=True); time.sleep(60)"
    )
    with subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) as proc:
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == "locked"
            assert agent_running(tmp_path) == proc.pid
        finally:
            proc.kill()
            proc.wait()
    assert agent_running(tmp_path) is None


def test_agent_key_is_stable_per_data_dir(tmp_path: Path) -> None:
    assert agent_key(tmp_path / "a") == agent_key(tmp_path / "a")
    assert agent_key(tmp_path / "a") != agent_key(tmp_path / "b")


def test_status_command_without_an_agent(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["worker", "status", "--json", "--data-dir", str(tmp_path)])
    assert result.exit_code == 1
    assert json.loads(result.stdout)["error"]["code"] == "not_found"
    assert "error:" in result.stderr


def test_status_command_reads_the_status_file(tmp_path: Path) -> None:
    save_status(
        tmp_path,
        {
            "pid": 1,
            "worker_id": "w1",
            "name": "box",
            "services": [{"name": "echo", "state": "running", "healthy": True}],
            "last_heartbeat": {"at": 1.0, "ok": True, "status": "online"},
        },
    )
    result = CliRunner().invoke(app, ["worker", "status", "--json", "--data-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["running"] is False
    assert doc["pid"] is None
    assert doc["services"][0]["name"] == "echo"
    human = CliRunner().invoke(app, ["worker", "status", "--data-dir", str(tmp_path)])
    assert human.exit_code == 0
    assert "not running" in human.stdout
    assert "echo" in human.stdout
