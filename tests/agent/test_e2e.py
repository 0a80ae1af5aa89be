"""End to end: a real coordinator process and a real `rma worker join` process (process runtime,
direct transport) serving a real HTTP service."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from rma.agent.hardware import detect

from .conftest import admin_workers, http_ok, procs_with, wait_for

pytestmark = pytest.mark.slow


def join_args(catalog: Path, *extra: str) -> list[str]:
    return [
        "--runtime",
        "process",
        "--transport",
        "direct",
        "--catalog",
        str(catalog),
        "--label",
        "rma.services=echo",
        "--name",
        "e2e-box",
        *extra,
    ]


def rma(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rma", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
        check=False,
    )


def cli_workers(coord: Any) -> list[dict[str, Any]]:
    """`rma admin workers --json`, as an operator would run it."""
    res = rma(
        "admin",
        "workers",
        "--json",
        env={"RMA_COORDINATOR_URL": coord.url, "RMA_ADMIN_KEY": coord.admin_key},
    )
    assert res.returncode == 0, res.stderr
    return list(json.loads(res.stdout))


def healthy_worker(coord: Any) -> dict[str, Any] | None:
    for w in cli_workers(coord):
        svc = {s["name"]: s for s in w["services"]}
        if w["status"] == "online" and svc.get("echo", {}).get("healthy"):
            return w
    return None


def through_gateway(coord: Any, service: str) -> str:
    """GET / of ``service`` through the coordinator's gateway, as a client with an API key."""
    with coord.admin() as c:
        key = c.post("/api/admin/keys", json={"name": "e2e"}).json()["key"]
    r = httpx.get(
        f"{coord.url}/api/services/{service}/",
        headers={"authorization": f"Bearer {key}"},
        timeout=30,
        trust_env=False,
    )
    assert r.status_code == 200, r.text
    return r.text


def echo_procs(data_dir: Path) -> list[Any]:
    return procs_with(str(data_dir / "services" / "echo"))


def test_join_serve_and_leave_on_sigterm(
    coordinator: Any, agent_factory: Any, echo_catalog: Path
) -> None:
    agent = agent_factory(
        coordinator.url, "--token", coordinator.token(), "--owner", "alice",
        *join_args(echo_catalog),
    )  # fmt: skip

    w = wait_for(lambda: healthy_worker(coordinator), 60, every=0.5)

    # tier and assignment: what this machine is, and only the service its label allows
    assert w["name"] == "e2e-box"
    assert w["owner"] == "alice"  # sent at registration (--owner)
    assert w["tier_name"] == detect(agent.data_dir).tier_name
    assert w["assignments"] == ["echo"]
    assert w["transport"] == "direct"
    (svc,) = w["services"]
    assert svc["state"] == "running"
    assert http_ok(svc["endpoint"] + "/")  # the coordinator's address for it really serves
    assert "Directory listing" in through_gateway(coordinator, "echo")  # and the gateway uses it
    assert w["capabilities"]["cpu_cores"] >= 1
    assert w["load"]["memory_percent"] > 0

    # identity saved, private, and it is this worker's
    ident_path = agent.data_dir / "worker.json"
    assert stat.S_IMODE(ident_path.stat().st_mode) == 0o600
    assert json.loads(ident_path.read_text())["worker_id"] == w["id"]

    # rma worker status: what it runs and the last heartbeat
    res = rma("worker", "status", "--json", "--data-dir", str(agent.data_dir))
    assert res.returncode == 0, res.stderr
    status = json.loads(res.stdout)
    assert status["running"] is True
    assert status["worker_id"] == w["id"]
    assert status["last_heartbeat"]["ok"] is True
    # the donor's own credits, from the coordinator's heartbeat answer
    assert status["owner"] == "alice"
    assert set(status["credits"]) == {"credits", "escrow"}
    assert status["credits"]["credits"] >= 0 and status["credits"]["escrow"] >= 0
    res = rma("worker", "status", "--data-dir", str(agent.data_dir))
    assert res.returncode == 0, res.stderr
    assert "credits: " in res.stdout and "owner alice" in res.stdout
    assert [(s["name"], s["state"], s["healthy"]) for s in status["services"]] == [
        ("echo", "running", True)
    ]
    (proc,) = echo_procs(agent.data_dir)

    agent.signal(signal.SIGTERM)
    assert agent.wait(60) == 0, agent.output()

    (after,) = [x for x in admin_workers(coordinator) if x["id"] == w["id"]]
    assert after["status"] == "left"
    assert all(not s["healthy"] for s in after["services"])
    assert [s["state"] for s in after["services"]] == ["stopped"]
    assert not echo_procs(agent.data_dir), "an orphan service process was left"
    assert not proc.is_running()
    assert not http_ok(svc["endpoint"] + "/")
    out = agent.output()
    assert "draining" in out
    assert "left the pool" in out
    assert "Traceback" not in out
    res = rma("worker", "status", "--json", "--data-dir", str(agent.data_dir))
    assert json.loads(res.stdout)["running"] is False


def test_sigkill_then_restart_rejoins_as_the_same_worker(
    coordinator: Any, agent_factory: Any, echo_catalog: Path
) -> None:
    first = agent_factory(
        coordinator.url, "--token", coordinator.token(uses=1), *join_args(echo_catalog)
    )
    w = wait_for(lambda: healthy_worker(coordinator), 60, every=0.5)
    (orphan,) = echo_procs(first.data_dir)

    first.signal(signal.SIGKILL)
    first.wait(10)
    assert orphan.is_running()  # its service outlived it: an orphan the next run must clean

    # no token this time (the one above was single-use): the saved identity is enough
    second = agent_factory(coordinator.url, *join_args(echo_catalog), data_dir=first.data_dir)

    def back() -> dict[str, Any] | None:
        hw = healthy_worker(coordinator)
        if hw is None:
            return None
        (s,) = hw["services"]
        return hw if s["endpoint"] != w["services"][0]["endpoint"] else None

    again = wait_for(back, 60, every=0.5)
    assert again["id"] == w["id"]
    assert len(admin_workers(coordinator)) == 1
    orphan.wait(10) if orphan.is_running() else None
    assert not orphan.is_running()
    assert len(echo_procs(first.data_dir)) == 1
    assert "left by an earlier run of this agent" in second.output()

    second.signal(signal.SIGTERM)
    assert second.wait(60) == 0, second.output()
    assert not echo_procs(first.data_dir)


def test_removed_by_the_operator_stops_and_exits_1(
    coordinator: Any, agent_factory: Any, echo_catalog: Path
) -> None:
    agent = agent_factory(coordinator.url, "--token", coordinator.token(), *join_args(echo_catalog))
    w = wait_for(lambda: healthy_worker(coordinator), 60, every=0.5)
    with coordinator.admin() as c:
        assert c.delete(f"/api/admin/workers/{w['id']}").status_code == 200
    assert agent.wait(30) == 1
    out = agent.output()
    assert "error: this worker was removed by the operator" in out
    assert "Traceback" not in out
    assert not echo_procs(agent.data_dir)


def test_a_bad_token_is_a_clear_error(
    coordinator: Any, agent_factory: Any, echo_catalog: Path
) -> None:
    agent = agent_factory(
        coordinator.url, "--token", "rma_join_nope.nope", *join_args(echo_catalog)
    )
    assert agent.wait(30) == 1
    out = agent.output()
    assert "error: the coordinator refused the join token" in out
    assert "Traceback" not in out
    assert not (agent.data_dir / "worker.json").exists()
    assert admin_workers(coordinator) == []


def test_no_token_and_no_identity(tmp_path: Path) -> None:
    res = rma(
        "worker",
        "join",
        "--coordinator",
        "http://127.0.0.1:9",
        "--runtime",
        "process",
        "--data-dir",
        str(tmp_path / "w"),
    )
    assert res.returncode == 1
    assert res.stderr.count("error:") == 1
    assert "no join token" in res.stderr


def test_bad_label_is_a_usage_error(tmp_path: Path) -> None:
    res = rma("worker", "join", "--token", "t", "--label", "novalue", "--data-dir", str(tmp_path))
    assert res.returncode == 2
    assert "KEY=VALUE" in res.stderr


def test_runtime_docker_without_an_engine(tmp_path: Path) -> None:
    res = rma(
        "worker",
        "join",
        "--token",
        "t",
        "--runtime",
        "docker",
        "--data-dir",
        str(tmp_path),
        env={"DOCKER_HOST": f"unix://{tmp_path}/none.sock"},
    )
    assert res.returncode == 1
    assert "error: --runtime docker: no Docker engine answers" in res.stderr
    assert "Traceback" not in res.stderr


def test_tunnel_transport_serves_through_the_gateway(
    coordinator: Any, agent_factory: Any, echo_catalog: Path
) -> None:
    """`--transport auto` is the tunnel: the service answers through the gateway with no
    address of the worker's known to the coordinator."""
    args = join_args(echo_catalog)
    args[args.index("direct")] = "auto"
    agent = agent_factory(coordinator.url, "--token", coordinator.token(), *args)
    w = wait_for(lambda: healthy_worker(coordinator), 60, every=0.5)
    assert w["transport"] == "tunnel"
    assert "Directory listing" in wait_for(lambda: _try_gateway(coordinator), 30, every=0.5)
    res = rma("worker", "status", "--json", "--data-dir", str(agent.data_dir))
    assert json.loads(res.stdout)["tunnel"]["connected"] is True
    agent.signal(signal.SIGTERM)
    assert agent.wait(60) == 0, agent.output()
    assert not echo_procs(agent.data_dir)


def _try_gateway(coord: Any, service: str = "echo") -> str | None:
    try:
        return through_gateway(coord, service)
    except AssertionError:
        return None


def test_draining_lets_an_in_flight_request_finish(
    coordinator: Any, agent_factory: Any, echo_catalog: Path
) -> None:
    """SIGTERM while a request is in flight through the tunnel: the agent drains (the request
    completes), then stops its services and leaves."""
    args = join_args(echo_catalog)
    args[args.index("direct")] = "auto"
    args[args.index("rma.services=echo")] = "rma.services=slow"
    agent = agent_factory(coordinator.url, "--token", coordinator.token(), *args)

    def slow_healthy() -> bool:
        return any(
            s["name"] == "slow" and s["healthy"] and w["status"] == "online"
            for w in admin_workers(coordinator)
            for s in w["services"]
        )

    wait_for(slow_healthy, 60, every=0.5)
    wait_for(lambda: _try_gateway(coordinator, "slow"), 30, every=0.5)  # the tunnel is up
    with coordinator.admin() as c:
        key = c.post("/api/admin/keys", json={"name": "drain"}).json()["key"]
    result: dict[str, Any] = {}

    def call() -> None:
        try:
            r = httpx.get(
                f"{coordinator.url}/api/services/slow/slow",
                headers={"authorization": f"Bearer {key}"},
                timeout=60,
                trust_env=False,
            )
            result["status"], result["body"] = r.status_code, r.text
        except httpx.HTTPError as exc:
            result["error"] = repr(exc)

    caller = threading.Thread(target=call)
    caller.start()
    time.sleep(1.5)  # the request is now waiting on the service, through the tunnel
    agent.signal(signal.SIGTERM)
    caller.join(60)
    assert result == {"status": 200, "body": "done"}
    assert agent.wait(60) == 0, agent.output()
    (w,) = admin_workers(coordinator)
    assert w["status"] == "left"
