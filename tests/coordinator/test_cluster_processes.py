"""Three real coordinators on one real PostgreSQL database, with real agents.

``rma coordinator serve`` x3 (A, B, C) and ``rma worker join`` x2: one tunnelled agent that
knows A then B (``--coordinator A,B``), one direct agent that knows B then C.  A registration on
one coordinator shows on the others at once; only the leader sweeps; SIGKILL the leader (A): a
follower leads within the bound, the tunnelled agent moves its heartbeats and tunnel to B, and no
worker is marked offline or removed for it.

Needs ``RMA_TEST_DATABASE_URL`` (PostgreSQL); skips otherwise (a failure under
``RMA_REQUIRE_ALL=1``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from tests.conftest import TEST_DB_URL, Coordinator, start_coordinator

from rma.coordinator.credentials import write_secret_file

pytestmark = [
    pytest.mark.slow,
    pytest.mark.postgres,
    pytest.mark.skipif(
        not TEST_DB_URL or not TEST_DB_URL.startswith("postgres"),
        reason="several coordinators need PostgreSQL: set RMA_TEST_DATABASE_URL",
    ),
]

#: Fast liveness: heartbeats every second, offline after 12 s of silence.
OFFLINE_AFTER = 12.0
ENV = {
    "RMA_HEARTBEAT_INTERVAL": "1",
    "RMA_OFFLINE_AFTER": str(OFFLINE_AFTER),
    "RMA_REMOVE_AFTER": "120",
    "RMA_SWEEP_INTERVAL": "0.5",
    "RMA_LEADER_RETRY_INTERVAL": "0.5",
}
#: A new leader within this many seconds of the old one's death ("a fraction of the window").
FAILOVER_BOUND = OFFLINE_AFTER / 2


def wait_for(what: str, check: Callable[[], Any], timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def get(coord: Coordinator, path: str, **params: Any) -> Any:
    with coord.admin() as c:
        r = c.get(path, params=params)
        r.raise_for_status()
        return r.json()


def readyz(coord: Coordinator) -> dict[str, Any]:
    try:
        return dict(httpx.get(f"{coord.url}/readyz", timeout=5).json())
    except httpx.HTTPError:
        return {}


def names(coord: Coordinator) -> dict[str, str]:
    """Worker name -> status, as this coordinator sees the pool."""
    return {w["name"]: w["status"] for w in get(coord, "/api/admin/workers")}


def metric(coord: Coordinator, name: str) -> float:
    text = httpx.get(f"{coord.url}/metrics", timeout=5).text
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


@pytest.fixture
def catalog(tmp_path: Path) -> Path:
    """Every built-in service kept off these workers: the agents only register and heartbeat."""
    from rma.catalog import load_catalog

    path = tmp_path / "catalog.toml"
    path.write_text(
        "\n".join(f'[services.{n}]\nlabels = {{ rma_test_never = "1" }}\n' for n in load_catalog())
    )
    return path


@pytest.fixture
def start_cluster(tmp_path: Path, database_url: str) -> Iterator[Callable[..., list[Coordinator]]]:
    """Start coordinators on one database (A first, so A leads); all stop at the end."""
    started: list[Coordinator] = []

    def start(names: tuple[str, ...], catalog: Path) -> list[Coordinator]:
        admin_key: str | None = None
        for name in names:
            data_dir = tmp_path / name
            if admin_key is not None:  # the others find A's admin key in the database
                write_secret_file(data_dir / "admin.key", admin_key)
            coord = start_coordinator(
                data_dir,
                database_url=database_url,
                extra_args=["--catalog", str(catalog)],
                env={**ENV, "RMA_COORDINATOR_NAME": name},
            )
            started.append(coord)
            admin_key = coord.admin_key
        return list(started)

    try:
        yield start
    finally:
        for coord in started:
            coord.stop()


@pytest.fixture
def cluster(start_cluster: Callable[..., list[Coordinator]], catalog: Path) -> list[Coordinator]:
    return start_cluster(("coord-a", "coord-b", "coord-c"), catalog)


@pytest.fixture
def agents(tmp_path: Path) -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    running: list[subprocess.Popen[bytes]] = []

    def start(urls: str, token: str, name: str, transport: str, catalog: Path) -> Any:
        args = ["--coordinator", urls, "--token", token, "--name", name]
        args += ["--transport", transport, "--runtime", "process", "--catalog", str(catalog)]
        args += ["--data-dir", str(tmp_path / name)]
        with open(tmp_path / f"{name}.log", "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "rma", "worker", "join", *args],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ},
            )
        running.append(proc)
        return proc

    yield start
    for proc in running:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def test_three_coordinators_share_the_pool_and_survive_the_leader(
    cluster: list[Coordinator],
    agents: Callable[..., subprocess.Popen[bytes]],
    catalog: Path,
    tmp_path: Path,
) -> None:
    a, b, c = cluster
    wait_for("one leader, named by all", lambda: all(readyz(x).get("leader") for x in cluster))
    roles = {readyz(x)["coordinator"]: readyz(x)["role"] for x in cluster}
    assert roles == {"coord-a": "leader", "coord-b": "follower", "coord-c": "follower"}
    assert {readyz(x)["leader"] for x in cluster} == {"coord-a"}
    assert [metric(x, "rma_leader") for x in cluster] == [1.0, 0.0, 0.0]

    # A registration on A appears on B and C (the notice, not a reload: seconds, not minutes).
    tunnelled = agents(f"{a.url},{b.url}", a.token(), "tunnelled", "tunnel", catalog)
    wait_for("A to list the tunnelled agent", lambda: names(a).get("tunnelled") == "online")
    seen_at = time.monotonic()
    # measured (printed at the end): well under a second on an idle machine
    wait_for("B and C to list it", lambda: "tunnelled" in names(b) and "tunnelled" in names(c), 15)
    spread = time.monotonic() - seen_at
    direct = agents(f"{b.url},{c.url}", b.token(), "direct", "direct", catalog)
    wait_for("A and C to list the direct agent", lambda: all(
        names(x).get("direct") == "online" for x in (a, c)
    ))  # fmt: skip
    wait_for("A to hold the tunnel", lambda: metric(a, "rma_tunnels_connected") == 1)

    # A worker that registers on C and falls silent is judged once, by the leader.
    with httpx.Client(base_url=c.url, timeout=10) as http:
        r = http.post(
            "/api/worker/register",
            json={
                "token": c.token(),
                "name": "silent",
                "capabilities": {"cpu_cores": 4, "memory_mb": 8192},
            },
        )
        assert r.status_code == 201, r.text
    wait_for("the silent worker to go offline", lambda: names(b).get("silent") == "offline")
    offline = [e for e in get(b, "/api/admin/events", limit=1000) if e["kind"] == "offline"]
    assert [(e["data"]["coordinator"]) for e in offline] == ["coord-a"], offline

    # SIGKILL the leader: its connection closes, a follower takes the lock.
    a.stop(signal.SIGKILL)
    killed_at = time.monotonic()
    wait_for("a new leader", lambda: readyz(b).get("role") == "leader" or (
        readyz(c).get("role") == "leader"
    ), FAILOVER_BOUND)  # fmt: skip
    failover = time.monotonic() - killed_at

    def agreed() -> str | None:  # a follower learns the new name at its next retry
        named = {readyz(b).get("leader"), readyz(c).get("leader")}
        return named.pop() if len(named) == 1 and named <= {"coord-b", "coord-c"} else None

    wait_for("B and C to agree on the new leader", agreed, 10)

    # The tunnelled agent moves to B (heartbeats and tunnel) and nobody is judged for it.
    wait_for("the tunnel on B", lambda: metric(b, "rma_tunnels_connected") == 1, 15)
    moved = time.monotonic() - killed_at

    def last_beat() -> str:
        return next(w for w in get(b, "/api/admin/workers") if w["name"] == "tunnelled")[
            "last_heartbeat_at"
        ]

    first = last_beat()
    wait_for("heartbeats reaching B", lambda: last_beat() != first, 10)
    # Past one whole offline window after the kill: still online on both survivors.
    time.sleep(max(0.0, OFFLINE_AFTER + 2 - (time.monotonic() - killed_at)))
    for coord in (b, c):
        seen = names(coord)
        assert (seen["tunnelled"], seen["direct"]) == ("online", "online"), seen
    judged = [
        e
        for e in get(b, "/api/admin/events", limit=1000)
        if e["kind"] in ("offline", "removed") and e["worker_id"] != _id(b, "silent")
    ]
    assert judged == []
    assert tunnelled.poll() is None and direct.poll() is None  # no agent was told to exit
    log = (tmp_path / "tunnelled.log").read_text()
    assert "removed by the operator" not in log
    print(
        f"\nspread {spread * 1000:.0f} ms, failover {failover * 1000:.0f} ms, "
        f"tunnel moved after {moved * 1000:.0f} ms"
    )


ROOT = Path(__file__).resolve().parents[2]
ECHO = f"""
[services.echo]
description = "a plain HTTP service (the fake backend's /echo)"
tier = 3
kind = "http"
command = ["{{python}}", "{ROOT / "bench" / "fake_backend.py"}", "--port", "{{port}}"]
health = "/health"
"""


def test_a_request_reaches_a_tunnel_held_by_another_coordinator(
    start_cluster: Callable[..., list[Coordinator]],
    agents: Callable[..., subprocess.Popen[bytes]],
    catalog: Path,
    tmp_path: Path,
) -> None:
    echo_catalog = tmp_path / "echo.toml"
    echo_catalog.write_text(
        ECHO
        + "\n".join(
            part for part in catalog.read_text().split("\n\n") if "[services.echo]" not in part
        )
    )
    a, b = start_cluster(("coord-a", "coord-b"), echo_catalog)
    agents(f"{a.url},{b.url}", a.token(), "tunnelled", "tunnel", echo_catalog)

    def echo_healthy(coord: Coordinator) -> bool:
        return any(
            w["name"] == "tunnelled"
            and any(s["name"] == "echo" and s["healthy"] for s in w["services"])
            for w in get(coord, "/api/admin/workers")
        )

    wait_for("echo healthy, seen from B", lambda: echo_healthy(b), 90)
    assert metric(a, "rma_tunnels_connected") == 1
    assert metric(b, "rma_tunnels_connected") == 0
    with a.admin() as c:
        key = c.post("/api/admin/keys", json={"name": "client"}).json()["key"]
    auth = {"authorization": f"Bearer {key}"}

    def ask(coord: Coordinator) -> httpx.Response:
        return httpx.post(
            f"{coord.url}/api/services/echo/echo/a%2Fb?x=1", content=b"hello", headers=auth,
            timeout=30,
        )  # fmt: skip

    # B holds no tunnel to the worker: it relays through A once A announced the tunnel.
    r = wait_for("B to relay", lambda: (resp := ask(b)).status_code == 200 and resp, 15)
    assert r.headers["x-rma-worker"] == "tunnelled"
    body = r.json()
    assert (body["method"], body["path"], body["body"]) == ("POST", "/echo/a%2Fb?x=1", "hello")
    assert metric(b, "rma_tunnels_connected") == 0

    # Nobody else may use the relay route.
    target = "/api/internal/relay/x/echo/echo"
    for headers in ({}, {"x-rma-relay": "1700000000.00"}, auth):
        refused = httpx.get(a.url + target, headers=headers, timeout=10)
        assert refused.status_code == 401, refused.text
        assert refused.json()["error"]["code"] == "invalid_relay"

    # A dies: the tunnel moves to B, which now serves the worker directly.
    a.stop(signal.SIGKILL)
    wait_for("the tunnel on B", lambda: metric(b, "rma_tunnels_connected") == 1, 15)
    r = wait_for("B to answer", lambda: (resp := ask(b)).status_code == 200 and resp, 15)
    assert r.headers["x-rma-worker"] == "tunnelled"


def _id(coord: Coordinator, name: str) -> str:
    return str(next(w["id"] for w in get(coord, "/api/admin/workers") if w["name"] == name))
