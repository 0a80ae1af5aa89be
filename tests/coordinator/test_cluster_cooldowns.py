"""Cool-downs across real coordinators on one real PostgreSQL database (and a real Redis).

- A tunnelled worker whose holder is SIGKILLed is cooled down by the survivor whose relay to the
  dead holder failed; once its tunnel re-attaches (to a third coordinator), the survivor lifts
  that cool-down (and the unreachable mark) at once and serves the worker again.
- A worker one coordinator cools down is cooled on the other within a second (Redis pub/sub, or
  the PostgreSQL change channel without Redis); a success on one lifts it on the other.

Cool-downs are 60 s here, so only the fix can lift one within the test.  Needs
``RMA_TEST_DATABASE_URL`` (PostgreSQL), and ``redis-server`` for the Redis case.
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from tests.conftest import TEST_DB_URL, Coordinator, free_port, start_coordinator

from rma.coordinator.credentials import write_secret_file

pytestmark = [
    pytest.mark.slow,
    pytest.mark.postgres,
    pytest.mark.skipif(
        not TEST_DB_URL or not TEST_DB_URL.startswith("postgres"),
        reason="several coordinators need PostgreSQL: set RMA_TEST_DATABASE_URL",
    ),
]

ROOT = Path(__file__).resolve().parents[2]
FAKE_BACKEND = ROOT / "bench" / "fake_backend.py"
COOLDOWN = 60.0
ENV = {
    "RMA_HEARTBEAT_INTERVAL": "1",
    "RMA_OFFLINE_AFTER": "120",
    "RMA_REMOVE_AFTER": "600",
    "RMA_SWEEP_INTERVAL": "0.5",
    "RMA_LEADER_RETRY_INTERVAL": "0.5",
    "RMA_COOLDOWN_BASE": str(COOLDOWN),
    "RMA_COOLDOWN_MAX": str(COOLDOWN),
    "RMA_CONNECT_TIMEOUT": "2",
    "RMA_FIRST_BYTE_TIMEOUT": "10",
}
CAPS = {"cpu_cores": 2, "memory_mb": 4096, "disk_free_mb": 10000, "os": "linux", "arch": "x86_64"}
_paths = itertools.count()


def catalog_text() -> str:
    """``echo`` on two workers; every built-in service kept off them."""
    from rma.catalog import load_catalog

    echo = f"""
[services.echo]
description = "a plain HTTP service (the fake backend's /echo)"
tier = 3
kind = "http"
command = ["{{python}}", "{FAKE_BACKEND}", "--port", "{{port}}"]
health = "/health"
replicas = 2
"""
    never = [
        f'[services.{n}]\nlabels = {{ rma_test_never = "1" }}\n'
        for n in load_catalog()
        if n != "echo"
    ]
    return echo + "\n" + "\n".join(never)


def wait_for(what: str, check: Callable[[], Any], timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def cooldowns(coord: Coordinator) -> dict[str, float]:
    """Worker name -> seconds left of its ``echo`` cool-down on this coordinator."""
    try:
        text = httpx.get(f"{coord.url}/metrics", timeout=5).text
    except httpx.HTTPError:
        return {}
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("rma_worker_cooldown_seconds{") and 'service="echo"' in line:
            name = line.split('worker="', 1)[1].split('"', 1)[0]
            out[name] = float(line.rsplit(" ", 1)[1])
    return out


def tunnels(coord: Coordinator) -> float:
    try:
        text = httpx.get(f"{coord.url}/metrics", timeout=5).text
    except httpx.HTTPError:
        return 0.0
    for line in text.splitlines():
        if line.startswith("rma_tunnels_connected "):
            return float(line.split()[1])
    return 0.0


class Backend:
    """A fake backend process (``bench/fake_backend.py``) on a free port."""

    def __init__(self, name: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, str(FAKE_BACKEND), "--port", str(self.port), "--name", name]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(f"backend {name}", self._up, 15)

    def _up(self) -> bool:
        assert self.proc.poll() is None
        try:
            return httpx.get(self.url + "/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


class Pool:
    """Coordinators, agents, backends and fake direct workers; everything stops at the end."""

    def __init__(self, tmp_path: Path, database_url: str) -> None:
        self.tmp_path = tmp_path
        self.database_url = database_url
        self.catalog = tmp_path / "catalog.toml"
        self.catalog.write_text(catalog_text())
        self.coords: list[Coordinator] = []
        self.procs: list[subprocess.Popen[bytes]] = []
        self.backends: list[Backend] = []
        self.workers: dict[str, str] = {}  # name -> credential
        self.admin_key: str | None = None
        self._key: str | None = None

    def coordinator(self, name: str, port: int | None = None, redis_url: str = "") -> Coordinator:
        data_dir = self.tmp_path / name
        if self.admin_key is not None:  # the others find the first one's admin key in the db
            write_secret_file(data_dir / "admin.key", self.admin_key)
        extra = ["--catalog", str(self.catalog)]
        extra += ["--redis-url", redis_url] if redis_url else []
        coord = start_coordinator(
            data_dir,
            port=port,
            database_url=self.database_url,
            extra_args=extra,
            env={**ENV, "RMA_COORDINATOR_NAME": name},
        )
        self.coords.append(coord)
        self.admin_key = self.admin_key or coord.admin_key
        return coord

    def key(self, coord: Coordinator) -> str:
        if self._key is None:
            with coord.admin() as c:
                r = c.post("/api/admin/keys", json={"name": "client", "rpm": 0})
                assert r.status_code == 201, r.text
                self._key = str(r.json()["key"])
        return self._key

    def agent(self, urls: str, token: str, name: str) -> None:
        args = ["--coordinator", urls, "--token", token, "--name", name, "--transport", "tunnel"]
        args += ["--runtime", "process", "--catalog", str(self.catalog)]
        args += ["--data-dir", str(self.tmp_path / name)]
        with open(self.tmp_path / f"{name}.log", "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "rma", "worker", "join", *args],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ},
            )
        self.procs.append(proc)

    def direct(self, coord: Coordinator, name: str, backend: Backend, cpu: float = 0.0) -> None:
        """Register a direct worker that reports ``echo`` healthy at ``backend`` (and its
        host ``cpu`` percent busy: the balancer prefers idle hosts among equals)."""
        body = {
            "token": coord.token(),
            "name": name,
            "capabilities": CAPS,
            "transport": "direct",
            "runnable": ["echo"],
        }
        r = httpx.post(coord.url + "/api/worker/register", json=body, timeout=10)
        assert r.status_code == 201, r.text
        self.workers[name] = r.json()["credential"]
        self.heartbeat(coord, name, backend, cpu)

    def heartbeat(self, coord: Coordinator, name: str, backend: Backend, cpu: float = 0.0) -> None:
        services = [{"name": "echo", "state": "running", "healthy": True, "endpoint": backend.url}]
        r = httpx.post(
            coord.url + "/api/worker/heartbeat",
            json={"services": services, "load": {"cpu_percent": cpu}},
            headers={"authorization": f"Bearer {self.workers[name]}"},
            timeout=10,
        )
        assert r.status_code == 200, r.text

    def backend(self, name: str) -> Backend:
        b = Backend(name)
        self.backends.append(b)
        return b

    def ask(self, coord: Coordinator) -> httpx.Response:
        """One request for ``echo`` (a new path each time: no affinity)."""
        return httpx.post(
            f"{coord.url}/api/services/echo/echo/{next(_paths)}",
            content=b"hello",
            headers={"authorization": f"Bearer {self.key(coord)}"},
            timeout=30,
        )

    def served_by(self, coord: Coordinator, name: str, tries: int = 200) -> bool:
        """Whether ``name`` answers one of up to ``tries`` requests through ``coord``."""
        for _ in range(tries):
            r = self.ask(coord)
            if r.status_code == 200 and r.headers.get("x-rma-worker") == name:
                return True
        return False

    def routes_to(self, coord: Coordinator, name: str) -> bool:
        with coord.admin() as c:
            workers = c.get("/api/admin/workers").json()
        return any(
            w["name"] == name and any(s["name"] == "echo" and s["healthy"] for s in w["services"])
            for w in workers
        )

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
        for coord in self.coords:
            coord.stop()
        for b in self.backends:
            b.kill()


@pytest.fixture
def pool(tmp_path: Path, database_url: str) -> Iterator[Pool]:
    made = Pool(tmp_path, database_url)
    try:
        yield made
    finally:
        made.close()


def test_a_reattached_tunnel_lifts_the_cool_down_its_dead_holder_caused(pool: Pool) -> None:
    a = pool.coordinator("coord-a")
    b = pool.coordinator("coord-b")
    c_port = free_port()  # C starts later: until then the agent's tunnel has nowhere to go
    pool.agent(f"{a.url},http://127.0.0.1:{c_port}", a.token(), "tunnelled")
    wait_for("echo healthy on the tunnelled worker, seen from B", lambda: pool.routes_to(
        b, "tunnelled"), 120)  # fmt: skip
    # A busy host: B prefers the tunnelled worker while both are idle.
    pool.direct(a, "direct", pool.backend("direct"), cpu=100.0)
    wait_for("B to see the direct worker", lambda: pool.routes_to(b, "direct"), 15)
    assert tunnels(a) == 1
    wait_for("B to relay to the tunnelled worker through A", lambda: pool.served_by(
        b, "tunnelled", 20), 30)  # fmt: skip

    # A dies: B's relays to it fail, and B cools the tunnelled worker down (60 s).
    a.stop(signal.SIGKILL)

    def cooled() -> float:
        ok = pool.ask(b)
        assert ok.status_code == 200, ok.text  # the direct worker answers meanwhile
        return cooldowns(b).get("tunnelled", 0.0)

    left = wait_for("B to cool the tunnelled worker down", cooled, 30)
    cooled_at = time.monotonic()
    assert left > COOLDOWN / 2  # the long one: only the fix can lift it within the test

    # Its tunnel re-attaches to C: B lifts the cool-down and serves the worker through C.
    pool.coordinator("coord-c", port=c_port)
    wait_for("the tunnel on C", lambda: tunnels(pool.coords[-1]) == 1, 60)
    remaining = cooled_at + left - time.monotonic()
    assert remaining > 5, "the tunnel took too long to re-attach for the test to tell"
    wait_for("B to lift the cool-down", lambda: "tunnelled" not in cooldowns(b), remaining - 2)
    assert pool.served_by(b, "tunnelled", 50), "B never served the re-attached worker"


@pytest.mark.parametrize("feed", ["redis", "postgres"])
def test_a_cool_down_on_one_coordinator_reaches_the_other_and_so_does_its_end(
    pool: Pool, tmp_path: Path, feed: str
) -> None:
    redis_url = ""
    server = None
    if feed == "redis":
        if shutil.which("redis-server") is None:
            pytest.skip("redis-server is missing (apt-get install redis-server)")
        from tests.coordinator.test_shared import RedisServer

        server = RedisServer(free_port(), tmp_path)
        server.start()
        redis_url = server.url
    try:
        a = pool.coordinator("coord-a", redis_url=redis_url)
        b = pool.coordinator("coord-b", redis_url=redis_url)
        good, bad = pool.backend("good"), pool.backend("bad")
        pool.direct(a, "good", good)
        pool.direct(a, "bad", bad)
        for coord in (a, b):
            wait_for("both workers routable", lambda c=coord: pool.routes_to(
                c, "good") and pool.routes_to(c, "bad"), 30)  # fmt: skip
        assert cooldowns(b) == {}

        bad.kill()  # its port refuses connections: A cools it down on its first try
        wait_for("A to cool the broken worker down", lambda: pool.ask(
            a).status_code == 200 and "bad" in cooldowns(a), 30)  # fmt: skip
        # B never tried it, yet avoids it: the cool-down came through the feed.
        wait_for("B to know of the cool-down", lambda: "bad" in cooldowns(b), 5)
        assert cooldowns(b)["bad"] > COOLDOWN / 2
        for _ in range(10):
            r = pool.ask(b)
            assert r.status_code == 200, r.text
            assert r.headers["x-rma-worker"] == "good"

        # The broken worker is repaired (a new endpoint in its heartbeat) and the good one
        # breaks: A, with nothing else left, serves through the cooled one, which lifts its
        # cool-down on A, and so on B.
        fixed = pool.backend("fixed")
        pool.heartbeat(a, "bad", fixed)
        good.kill()
        wait_for("A to serve through the repaired worker", lambda: pool.served_by(
            a, "bad", 20), 30)  # fmt: skip
        wait_for("A to lift its cool-down", lambda: "bad" not in cooldowns(a), 10)
        wait_for("B to lift it too", lambda: "bad" not in cooldowns(b), 5)
    finally:
        if server is not None:
            server.kill()
