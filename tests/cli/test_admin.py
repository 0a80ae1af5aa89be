"""``rma admin ...`` through CliRunner against a real coordinator process."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from .conftest import Invoke, assert_one_error, json_out

pytestmark = pytest.mark.slow

CAPS = {"cpu_cores": 4, "memory_mb": 8192}


def _join(url: str, token: str, name: str) -> dict[str, Any]:
    r = httpx.post(
        f"{url}/api/worker/register",
        json={"token": token, "name": name, "capabilities": CAPS},
        timeout=10,
    )
    assert r.status_code == 201, r.text
    return dict(r.json())


def test_tokens_create_list_revoke(rma: Invoke, coordinator_process: Any) -> None:
    created = json_out(
        rma("admin", "tokens", "create", "--ttl", "2h", "--uses", "3", "--label", "bob", "--json")
    )
    assert created["token"].startswith("rma_join_")
    assert created["uses"] == 3
    assert created["label"] == "bob"
    assert created["status"] == "active"
    listed = json_out(rma("admin", "tokens", "list", "--json"))
    assert [t["id"] for t in listed] == [created["id"]]
    assert "token" not in listed[0]
    table = rma("admin", "tokens", "list")
    assert table.exit_code == 0
    assert created["id"] in table.stdout
    assert "bob" in table.stdout
    assert "0/3" in table.stdout
    assert created["token"] not in table.stdout + table.stderr
    # the token works for a registration, then is revoked
    _join(coordinator_process.url, created["token"], "w1")
    revoked = json_out(rma("admin", "tokens", "revoke", created["id"], "--json"))
    assert revoked["status"] == "revoked"
    assert revoked["used"] == 1
    r = httpx.post(
        f"{coordinator_process.url}/api/worker/register",
        json={"token": created["token"], "name": "w2", "capabilities": CAPS},
    )
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "token_revoked"


def test_tokens_create_prints_the_secret_alone_on_stdout(rma: Invoke) -> None:
    result = rma("admin", "tokens", "create", "--unlimited", "--ttl", "10m")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip().startswith("rma_join_")
    assert len(result.stdout.strip().splitlines()) == 1
    assert "shown only now" in result.stderr
    listed = json_out(rma("admin", "tokens", "list", "--json"))
    assert listed[0]["uses"] is None


def test_keys_create_list_revoke(rma: Invoke) -> None:
    created = json_out(rma("admin", "keys", "create", "--name", "app", "--rpm", "60", "--json"))
    assert created["key"].startswith("rma_key_")
    assert created["rpm"] == 60
    listed = json_out(rma("admin", "keys", "list", "--json"))
    assert [(k["id"], k["name"], k["revoked"]) for k in listed] == [(created["id"], "app", False)]
    assert "key" not in listed[0]
    table = rma("admin", "keys", "list")
    assert created["id"] in table.stdout
    assert created["key"] not in table.stdout + table.stderr
    assert json_out(rma("admin", "keys", "revoke", created["id"], "--json"))["revoked"] is True
    assert json_out(rma("admin", "keys", "list", "--json"))[0]["revoked"] is True


def test_workers_show_drain_undrain_remove(rma: Invoke, coordinator_process: Any) -> None:
    token = coordinator_process.token(uses=2)
    a = _join(coordinator_process.url, token, "alpha")
    b = _join(coordinator_process.url, token, "beta")
    workers = json_out(rma("admin", "workers", "--json"))
    assert sorted(w["name"] for w in workers) == ["alpha", "beta"]
    assert {w["status"] for w in workers} == {"online"}
    assert set(workers[0]) >= {
        "id", "name", "status", "tier", "tier_name", "capabilities", "labels", "services",
        "load", "transport", "trusted", "registered_at", "last_heartbeat_at",
    }  # fmt: skip
    table = rma("admin", "workers")
    assert table.exit_code == 0
    assert "alpha" in table.stdout
    assert "service" in table.stdout

    shown = json_out(rma("admin", "worker", a["worker_id"], "--json"))
    assert shown["id"] == a["worker_id"]
    assert shown["capabilities"]["memory_mb"] == 8192
    human = rma("admin", "worker", a["worker_id"])
    assert human.exit_code == 0
    assert "8192 MB RAM" in human.stdout

    assert json_out(rma("admin", "drain", a["worker_id"], "--json"))["status"] == "draining"
    drained = rma("admin", "workers", "--status", "draining", "--json")
    assert [w["id"] for w in json_out(drained)] == [a["worker_id"]]
    plain = rma("admin", "undrain", a["worker_id"])
    assert plain.exit_code == 0
    assert "online" in plain.stderr
    assert json_out(rma("admin", "remove", b["worker_id"], "--json"))["status"] == "removed"
    statuses = {w["name"]: w["status"] for w in json_out(rma("admin", "workers", "--json"))}
    assert statuses == {"alpha": "online", "beta": "removed"}


def test_stats_and_events(rma: Invoke, coordinator_process: Any) -> None:
    _join(coordinator_process.url, coordinator_process.token(), "alpha")
    stats = json_out(rma("admin", "stats", "--json"))
    assert stats["workers"]["total"] == 1
    assert stats["workers"]["by_status"]["online"] == 1
    assert any(s["name"] == "llm" and s["assigned"] == 1 for s in stats["services"])
    human = rma("admin", "stats")
    assert human.exit_code == 0
    assert "workers" in human.stdout
    assert "llm" in human.stdout
    events = json_out(rma("admin", "events", "--json"))
    kinds = [e["kind"] for e in events]
    assert "token_created" in kinds
    assert "joined" in kinds
    human = rma("admin", "events")
    assert human.exit_code == 0
    assert "alpha joined" in human.stdout


def test_unknown_ids_fail_cleanly(rma: Invoke) -> None:
    for args in (
        ["admin", "worker", "nope"],
        ["admin", "drain", "nope"],
        ["admin", "remove", "nope"],
        ["admin", "tokens", "revoke", "nope"],
        ["admin", "keys", "revoke", "nope"],
    ):
        assert "'nope'" in assert_one_error(rma(*args))
        assert_one_error(rma(*args, "--json"), json_mode=True, code="not_found")


def test_wrong_admin_key_fails_cleanly(rma: Invoke) -> None:
    line = assert_one_error(rma("admin", "workers", "--admin-key", "rma_admin_wrong"))
    assert "invalid admin key" in line
    assert_one_error(
        rma("admin", "workers", "--json", env={"RMA_ADMIN_KEY": "rma_admin_wrong"}),
        json_mode=True,
        code="unauthorized",
    )


def test_no_admin_key_anywhere(runner: Any, coordinator_process: Any, tmp_path: Any) -> None:
    from rma.cli.main import app

    result = runner.invoke(
        app,
        ["admin", "workers", "--json"],
        env={"RMA_COORDINATOR_URL": coordinator_process.url, "RMA_DATA_DIR": str(tmp_path / "x")},
    )
    line = assert_one_error(result, json_mode=True, code="no_admin_key")
    assert "--admin-key" in line


def test_unreachable_coordinator(runner: Any, tmp_path: Any) -> None:
    import socket

    from rma.cli.main import app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    env = {"RMA_ADMIN_KEY": "rma_admin_x", "RMA_DATA_DIR": str(tmp_path)}
    for args in (["admin", "workers"], ["admin", "stats", "--json"], ["admin", "events", "-f"]):
        result = runner.invoke(app, [*args, "--coordinator", url], env=env)
        line = assert_one_error(result, json_mode="--json" in args, code="unreachable")
        assert f"cannot reach the coordinator at {url}" in line


def test_bad_client_settings_fail_cleanly(runner: Any, tmp_path: Any) -> None:
    from rma.cli.main import app

    cases = [
        (["admin", "workers", "--coordinator", "ftp://x"], {}),
        (["admin", "workers", "--ca-file", str(tmp_path / "missing.pem")], {}),
        (["admin", "workers", "--json"], {"RMA_TIMEOUT": "soon"}),
    ]
    for args, env in cases:
        result = runner.invoke(app, args, env={"RMA_ADMIN_KEY": "rma_admin_x", **env})
        assert_one_error(result, json_mode="--json" in args)


def test_bad_usage_is_exit_2(runner: Any) -> None:
    from rma.cli.main import app

    result = runner.invoke(app, ["admin", "workers", "--status", "sleeping"])
    assert result.exit_code == 2
    result = runner.invoke(app, ["admin", "tokens", "create", "--ttl", "forever"])
    assert result.exit_code == 2
    assert "duration" in result.output


def test_every_admin_command_has_json(runner: Any) -> None:
    """Every command that prints data takes --json (the contract)."""
    from rma.cli.main import app

    commands = [
        ["admin", "workers"], ["admin", "worker", "x"], ["admin", "drain", "x"],
        ["admin", "undrain", "x"], ["admin", "remove", "x"], ["admin", "tokens", "create"],
        ["admin", "tokens", "list"], ["admin", "tokens", "revoke", "x"],
        ["admin", "keys", "create"], ["admin", "keys", "list"], ["admin", "keys", "revoke", "x"],
        ["admin", "stats"], ["admin", "events"],
    ]  # fmt: skip
    for cmd in commands:
        words = cmd[:-1] if cmd[-1] == "x" else cmd
        result = runner.invoke(app, [*words, "--help"])
        assert result.exit_code == 0, (cmd, result.output)
        assert "--json" in result.stdout, cmd


def test_events_follow_json_prints_one_object_per_line(coordinator_process: Any) -> None:
    """``rma admin events --follow --json`` in a real subprocess, reading its stdout live."""
    import os
    import subprocess
    import sys
    import time

    env = {
        **os.environ,
        "RMA_COORDINATOR_URL": coordinator_process.url,
        "RMA_DATA_DIR": str(coordinator_process.data_dir),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "rma", "admin", "events", "--follow", "--json"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(1.5)  # let it connect before the event happens
        _join(coordinator_process.url, coordinator_process.token(), "streamed")
        deadline = time.monotonic() + 20
        seen: list[dict[str, Any]] = []
        assert proc.stdout is not None
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            doc = json.loads(line)  # every line is a JSON object
            seen.append(doc)
            if doc["kind"] == "joined":
                break
        assert any(e["kind"] == "joined" and "streamed" in e["message"] for e in seen), seen
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=10)  # closes the pipes
    assert "Traceback" not in err
