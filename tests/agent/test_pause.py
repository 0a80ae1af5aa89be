"""Pause and resume, end to end: a real coordinator process, a real `rma worker join` process
(process runtime, direct transport) and its real service; `rma worker pause|resume` as a donor
runs them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from .conftest import admin_workers, procs_with, wait_for

pytestmark = pytest.mark.slow


def rma(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rma", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=os.environ.copy(),
        check=False,
    )


def join_args(catalog: Path, service: str = "echo") -> list[str]:
    return [
        "--runtime",
        "process",
        "--transport",
        "direct",
        "--catalog",
        str(catalog),
        "--label",
        f"rma.services={service}",
        "--name",
        "donor-box",
    ]


def the_worker(coord: Any) -> dict[str, Any]:
    (w,) = admin_workers(coord)
    return w


def serving(coord: Any, service: str) -> bool:
    workers = admin_workers(coord)
    if not workers:
        return False
    (w,) = workers
    svc = {s["name"]: s for s in w["services"]}
    return w["status"] == "online" and bool(svc.get(service, {}).get("healthy"))


def api_key(coord: Any) -> str:
    with coord.admin() as c:
        return str(c.post("/api/admin/keys", json={"name": "donor"}).json()["key"])


def gateway_get(coord: Any, key: str, path: str) -> httpx.Response:
    return httpx.get(
        f"{coord.url}/api/services/{path}",
        headers={"authorization": f"Bearer {key}"},
        timeout=30,
        trust_env=False,
    )


def service_procs(data_dir: Path, service: str) -> list[Any]:
    return procs_with(str(data_dir / "services" / service))


def test_pause_stops_everything_and_resume_serves_again(
    coordinator: Any, agent_factory: Any, echo_catalog: Path
) -> None:
    agent = agent_factory(
        coordinator.url,
        "--token",
        coordinator.token(),
        *join_args(echo_catalog),
        env={"RMA_CHECK_INTERVAL": "0.5"},
    )
    dd = str(agent.data_dir)
    wait_for(lambda: serving(coordinator, "echo"), 60, every=0.5)
    key = api_key(coordinator)
    assert gateway_get(coordinator, key, "echo/").status_code == 200
    assert service_procs(agent.data_dir, "echo")

    res = rma("worker", "pause", "--reason", "gaming", "--wait", "--json", "--data-dir", dd)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["state"] == "paused"

    # no service process left; the coordinator shows it paused (not offline, not draining)
    wait_for(lambda: not service_procs(agent.data_dir, "echo"), 30)
    w = wait_for(lambda: (w := the_worker(coordinator))["status"] == "paused" and w, 30)
    assert "gaming" in w["pause_reason"]
    assert agent.alive()
    # it keeps heartbeating while paused, and nothing is routed to it
    beat = w["last_heartbeat_at"]
    wait_for(lambda: the_worker(coordinator)["last_heartbeat_at"] != beat, 30)
    assert the_worker(coordinator)["status"] == "paused"
    r = gateway_get(coordinator, key, "echo/")
    assert r.status_code == 503, r.text
    assert "echo" in r.json()["error"]["message"]
    st = rma("worker", "status", "--json", "--data-dir", dd)
    assert st.returncode == 0, st.stderr
    doc = json.loads(st.stdout)
    assert doc["state"] == "paused" and doc["paused"] is True
    assert doc["services"] == []

    res = rma("worker", "resume", "--wait", "--json", "--data-dir", dd)
    assert res.returncode == 0, res.stderr
    wait_for(lambda: serving(coordinator, "echo"), 60, every=0.5)
    assert service_procs(agent.data_dir, "echo")
    assert gateway_get(coordinator, key, "echo/").status_code == 200
    assert the_worker(coordinator)["pause_reason"] is None
    with coordinator.admin() as c:
        kinds = [e["kind"] for e in c.get("/api/admin/events").json()]
    assert "paused" in kinds


def test_pause_lets_the_request_in_flight_finish(
    coordinator: Any, agent_factory: Any, echo_catalog: Path
) -> None:
    import threading

    from rma.agent.state import load_status

    agent = agent_factory(
        coordinator.url,
        "--token",
        coordinator.token(),
        *join_args(echo_catalog, "slow"),
        env={"RMA_CHECK_INTERVAL": "0.5"},
    )
    wait_for(lambda: serving(coordinator, "slow"), 60, every=0.5)
    port = wait_for(lambda: _port(load_status(agent.data_dir), "slow"), 30)
    key = api_key(coordinator)
    got: list[httpx.Response] = []
    t = threading.Thread(target=lambda: got.append(gateway_get(coordinator, key, "slow/slow")))
    t.start()
    try:
        wait_for(lambda: _connections(port, psutil.CONN_ESTABLISHED), 20)  # the request is in
        res = rma("worker", "pause", "--for", "1h", "--data-dir", str(agent.data_dir))
        assert res.returncode == 0, res.stderr
        wait_for(lambda: _port(load_status(agent.data_dir), "slow") is None, 60)
    finally:
        t.join(60)
    # the request finished before the service was stopped; nothing listens there any more
    assert got and got[0].status_code == 200 and got[0].text == "done"
    assert not _connections(port, psutil.CONN_LISTEN)
    assert the_worker(coordinator)["status"] == "paused"


def _port(doc: dict[str, Any] | None, service: str) -> int | None:
    for s in (doc or {}).get("services", []):
        if s["name"] == service and s.get("port"):
            return int(s["port"])
    return None


def _connections(port: int, status: str) -> int:
    return sum(
        1
        for c in psutil.net_connections("tcp")
        if c.laddr and c.laddr.port == port and c.status == status
    )


def test_pause_and_prefs_bad_input(tmp_path: Path) -> None:
    dd = str(tmp_path / "w")
    res = rma("worker", "pause", "--for", "soon", "--data-dir", dd)
    assert res.returncode == 2 and "error:" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "w" / "pause.json").exists()
    res = rma("worker", "prefs", "set", "--hours", "25:00-26:00", "--data-dir", dd)
    assert res.returncode == 1 and "error:" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "w" / "prefs.json").exists()
    res = rma(
        "worker",
        "prefs",
        "set",
        "--idle-minutes",
        "5",
        "--hours",
        "22:00-07:00",
        "--data-dir",
        dd,
        "--json",
    )
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["idle_minutes"] == 5
    res = rma("worker", "prefs", "show", "--json", "--data-dir", dd)
    assert json.loads(res.stdout)["hours"] == "22:00-07:00"
    res = rma("worker", "prefs", "set", "--reset", "hours", "--json", "--data-dir", dd)
    doc = json.loads(res.stdout)
    assert doc["hours"] is None and doc["idle_minutes"] == 5


def test_status_shows_what_the_machine_did(
    coordinator: Any, agent_factory: Any, echo_catalog: Path
) -> None:
    """Over the tunnel the agent counts the requests it served (today, in total) and its uptime;
    they are kept in served.json."""
    args = join_args(echo_catalog)
    args[args.index("direct")] = "tunnel"
    agent = agent_factory(coordinator.url, "--token", coordinator.token(), *args)
    wait_for(lambda: serving(coordinator, "echo"), 60, every=0.5)
    key = api_key(coordinator)
    for _ in range(3):
        assert gateway_get(coordinator, key, "echo/").status_code == 200

    def status() -> dict[str, Any]:
        res = rma("worker", "status", "--json", "--data-dir", str(agent.data_dir))
        assert res.returncode == 0, res.stderr
        return dict(json.loads(res.stdout))

    doc = wait_for(lambda: (d := status())["served"]["total"] >= 3 and d, 30)
    assert doc["served"]["today"] == doc["served"]["total"]
    assert doc["served"]["counted"] is True
    assert doc["state"] == "serving" and doc["uptime_s"] >= 0
    human = rma("worker", "status", "--data-dir", str(agent.data_dir))
    assert "state: serving" in human.stdout
    assert f"{doc['served']['total']} in total" in human.stdout
