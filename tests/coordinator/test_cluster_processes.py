"""Three real coordinators on one real PostgreSQL database, with real agents.

``rma coordinator serve`` x3 (A, B, C) and ``rma worker join`` x2: one tunnelled agent that
knows A then B (``--coordinator A,B``), one direct agent that knows B then C.  A registration on
one coordinator shows on the others at once; only the leader sweeps; SIGKILL the leader (A): a
follower leads within the bound, the tunnelled agent moves its heartbeats and tunnel to B, and no
worker is marked offline or removed for it.

The whole topology (the issue's must-show): a real ``redis-server`` and a real HAProxy
(``containers/haproxy.cfg`` on loopback) in front of three coordinators, six agents (three tunnel,
three direct; two name the coordinators, four only the balancer), ``openai`` clients through the
balancer; SIGKILL the leader under load and count what was lost, placing each loss by HAProxy's
log line for its ``x-request-id``.

Needs ``RMA_TEST_DATABASE_URL`` (PostgreSQL), and for the whole topology ``haproxy`` and
``redis-server``; skips otherwise (a failure under ``RMA_REQUIRE_ALL=1``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
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

    def start(
        names: tuple[str, ...], catalog: Path, extra_args: tuple[str, ...] = ()
    ) -> list[Coordinator]:
        admin_key: str | None = None
        for name in names:
            data_dir = tmp_path / name
            if admin_key is not None:  # the others find A's admin key in the database
                write_secret_file(data_dir / "admin.key", admin_key)
            coord = start_coordinator(
                data_dir,
                database_url=database_url,
                extra_args=["--catalog", str(catalog), *extra_args],
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


# --- the whole topology: Redis, HAProxy in front, six agents, client load, SIGKILL ------------

HAPROXY = shutil.which("haproxy") or next(
    (p for p in ("/usr/sbin/haproxy",) if Path(p).exists()), None
)
FAKE = f"""
[services.fake]
description = "a fake OpenAI backend (bench/fake_backend.py), 50 ms per answer"
tier = 3
kind = "openai"
models = ["fake-model"]
command = ["{{python}}", "{ROOT / "bench" / "fake_backend.py"}", "--port", "{{port}}",
           "--delay", "0.05"]
health = "/health"
replicas = 6
"""
#: Concurrent clients (threads, each with its own ``openai`` client) through the balancer.
CLIENTS = 6
#: A tunnelled worker must hold a tunnel to a live coordinator again within this many seconds.
REATTACH_BOUND = 5.0
#: ``{x-request-id} server status termination-state``: one line per request through HAProxy.
LOG_LINE = re.compile(r"^\{(?P<rid>[^}]*)\} (?P<server>\S+) (?P<status>-?\d+) (?P<term>\S+)")


def haproxy_config(port: int, servers: dict[str, str]) -> str:
    """``containers/haproxy.cfg`` as shipped, on loopback, naming these coordinators, with a
    log line per request (to stdout) and the serving backend in a response header."""
    cfg = (ROOT / "containers" / "haproxy.cfg").read_text()
    cfg = "\n".join(line for line in cfg.splitlines() if not line.strip().startswith("server "))
    cfg = cfg.replace("bind *:8420", f"bind 127.0.0.1:{port}")
    cfg = re.sub(r"maxconn \d+", "maxconn 1000", cfg)  # within a test runner's file limit
    cfg = cfg.replace("global\n", "global\n    log stdout format raw local0\n", 1)
    cfg = cfg.replace(
        "defaults\n",
        'defaults\n    log global\n    log-format "%hr %s %ST %tsc"\n',
        1,
    )
    cfg = cfg.replace(
        "frontend rma\n", "frontend rma\n    capture request header x-request-id len 64\n", 1
    )
    cfg += "\n    http-response set-header x-rma-backend %s\n"
    for name, url in servers.items():
        cfg += f"    server {name} {url.removeprefix('http://')} check\n"
    return cfg


@pytest.fixture
def balancer(tmp_path: Path) -> Iterator[Callable[[dict[str, str]], tuple[str, Path]]]:
    """A real HAProxy in front of the given coordinators: its URL and its log file."""
    if HAPROXY is None:
        pytest.skip("haproxy is missing (apt-get install haproxy)")
    procs: list[subprocess.Popen[bytes]] = []

    def start(servers: dict[str, str]) -> tuple[str, Path]:
        from tests.conftest import free_port

        port = free_port()
        cfg = tmp_path / "haproxy.cfg"
        cfg.write_text(haproxy_config(port, servers))
        log = tmp_path / "haproxy.log"
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                [str(HAPROXY), "-db", "-f", str(cfg)], stdout=out, stderr=subprocess.STDOUT
            )
        procs.append(proc)
        url = f"http://127.0.0.1:{port}"

        def up() -> bool:
            assert proc.poll() is None, log.read_text()
            try:
                return httpx.get(url + "/readyz", timeout=5).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for("HAProxy to pass a request", up, 30)
        return url, log

    yield start
    for proc in procs:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    from tests.conftest import free_port
    from tests.coordinator.test_shared import RedisServer

    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is missing (apt-get install redis-server)")
    server = RedisServer(free_port(), tmp_path)
    server.start()
    try:
        yield server.url
    finally:
        server.kill()


@dataclass
class Outcome:
    rid: str
    sent: float
    done: float
    error: str | None  # None: answered (200)
    worker: str = ""  # the worker that answered (x-rma-worker)
    backend: str = ""  # the coordinator that HAProxy sent it to (x-rma-backend)


class Load:
    """``CLIENTS`` threads sending non-streamed chat completions (the ``openai`` SDK, no
    retries: a failure is counted, never hidden) until stopped."""

    def __init__(self, base_url: str, key: str) -> None:
        self.base_url, self.key = base_url, key
        self.outcomes: list[Outcome] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.threads = [
            threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(CLIENTS)
        ]

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(60)

    def _run(self, index: int) -> None:
        import openai

        # One connection per request: HAProxy closes a kept-alive client connection without an
        # answer (and without a log line) when the server dies before answering a request that
        # was not the connection's first (the client may resend it, RFC 9112 9.3.1); on a fresh
        # connection it answers 502 and logs the server, so every loss is counted and placed.
        fresh = openai.DefaultHttpxClient(limits=httpx.Limits(max_keepalive_connections=0))
        with openai.OpenAI(
            base_url=self.base_url + "/v1",
            api_key=self.key,
            max_retries=0,
            timeout=30,
            http_client=fresh,
        ) as client:
            n = 0
            while not self.stop.is_set():
                n += 1
                rid = f"c{index}-{n}"
                sent = time.monotonic()
                error: str | None = None
                worker = backend = ""
                try:
                    raw = client.chat.completions.with_raw_response.create(
                        model="fake-model",
                        # one conversation each: cache affinity keeps none on one worker
                        messages=[{"role": "user", "content": f"hello {rid}"}],
                        extra_headers={"x-request-id": rid},
                    )
                    worker = raw.headers.get("x-rma-worker", "")
                    backend = raw.headers.get("x-rma-backend", "")
                    assert raw.parse().choices, raw
                except openai.APIStatusError as exc:
                    error = f"{exc.status_code}"
                except openai.APIError as exc:
                    error = f"{type(exc).__name__} ({exc.__cause__!r})"
                with self.lock:
                    done = time.monotonic()
                    self.outcomes.append(Outcome(rid, sent, done, error, worker, backend))

    def answered(self, after: float = 0.0) -> int:
        with self.lock:
            return sum(1 for o in self.outcomes if o.error is None and o.sent >= after)


class EventFollower:
    """``GET /api/admin/events?follow=true`` on one coordinator, read in a thread."""

    def __init__(self, coord: Coordinator) -> None:
        self.client = coord.admin()
        self.client.timeout = httpx.Timeout(10, read=None)
        self.events: list[dict[str, Any]] = []
        self.connected = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            with self.client.stream("GET", "/api/admin/events", params={"follow": "true"}) as r:
                for line in r.iter_lines():
                    if line.startswith(": connected"):
                        self.connected.set()
                    elif line.startswith("data: "):
                        self.events.append(json.loads(line.removeprefix("data: ")))
        except (httpx.HTTPError, RuntimeError, ValueError):
            pass  # closed at the end of the test

    def __enter__(self) -> EventFollower:
        self.thread.start()
        wait_for("the event stream", self.connected.is_set, 30)
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.close()
        self.thread.join(30)


class Watch:
    """Lists the workers of each coordinator in its own thread until all show ``wanted``."""

    def __init__(self, coords: list[Coordinator], wanted: set[str]) -> None:
        self.coords, self.wanted = coords, wanted
        self.without: list[dict[str, float]] = [{} for _ in coords]  # name -> last L
        self.with_: list[dict[str, float]] = [{} for _ in coords]  # name -> first U
        self.stop = threading.Event()
        self.threads = [
            threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(len(coords))
        ]

    def _run(self, i: int) -> None:
        with self.coords[i].admin() as http:
            while not self.stop.is_set():
                sent = time.monotonic()
                try:
                    listed = {w["name"] for w in http.get("/api/admin/workers").json()}
                except httpx.HTTPError:
                    continue
                done = time.monotonic()
                for name in self.wanted:
                    if name in listed:
                        self.with_[i].setdefault(name, done)
                    elif name not in self.with_[i]:
                        self.without[i][name] = sent
                time.sleep(0.01)

    def complete(self) -> bool:
        return all(len(seen) == len(self.wanted) for seen in self.with_)

    def spread(self) -> dict[str, tuple[float, float]]:
        out = {}
        for name in self.wanted:
            lows = [w.get(name, self.started) for w in self.without]
            highs = [w[name] for w in self.with_]
            out[name] = (max(0.0, max(lows) - min(highs)), max(highs) - min(lows))
        return out

    def __enter__(self) -> Watch:
        self.started = time.monotonic()
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)


def test_three_coordinators_behind_haproxy_lose_the_leader_under_load(
    start_cluster: Callable[..., list[Coordinator]],
    agents: Callable[..., subprocess.Popen[bytes]],
    balancer: Callable[[dict[str, str]], tuple[str, Path]],
    redis_url: str,
    catalog: Path,
    tmp_path: Path,
) -> None:
    """The issue's must-show: PostgreSQL, Redis, HAProxy, 3 coordinators, 6 agents (3 tunnel,
    3 direct), client load; SIGKILL the leader and count what was lost."""
    fake_catalog = tmp_path / "fake.toml"
    fake_catalog.write_text(
        FAKE + "\n".join(p for p in catalog.read_text().split("\n\n") if "[services.fake]" not in p)
    )
    cluster = start_cluster(
        ("coord-a", "coord-b", "coord-c"), fake_catalog, ("--redis-url", redis_url)
    )
    a, b, c = cluster
    wait_for("A to lead, named by all", lambda: all(
        readyz(x).get("leader") == "coord-a" for x in cluster
    ))  # fmt: skip
    assert [readyz(x).get("redis") for x in cluster] == ["ok"] * 3
    lb, lb_log = balancer({"coord-a": a.url, "coord-b": b.url, "coord-c": c.url})

    with EventFollower(c) as follower:
        # A worker that registers (through the balancer) and falls silent: judged once.
        r = httpx.post(
            f"{lb}/api/worker/register",
            json={
                "token": a.token(),
                "name": "silent",
                "capabilities": {"cpu_cores": 4, "memory_mb": 8192},
            },
            timeout=10,
        )
        assert r.status_code == 201, r.text
        # Six agents: one of each kind knows the coordinators by name (A first, so its tunnel
        # is on the leader), the others only the balancer.
        token = a.token(uses=10)
        plan = {
            "tunnel-1": (f"{a.url},{b.url},{c.url}", "tunnel"),
            "tunnel-2": (lb, "tunnel"),
            "tunnel-3": (lb, "tunnel"),
            "direct-1": (f"{c.url},{b.url},{a.url}", "direct"),
            "direct-2": (lb, "direct"),
            "direct-3": (lb, "direct"),
        }
        # Registrations on any coordinator appear on all.  One thread per coordinator lists the
        # workers over and over: a worker appeared on X after the last listing without it was
        # sent (L) and before the first with it came back (U).  So the spread between the first
        # and the last coordinator to show it lies in [max L - min U, max U - min L].
        with Watch(cluster, set(plan)) as watch:
            procs = {
                name: agents(urls, token, name, transport, fake_catalog)
                for name, (urls, transport) in plan.items()
            }
            wait_for("six workers on all three", watch.complete, 180)
        spread = watch.spread()
        assert max(low for low, _ in spread.values()) <= 1.0, spread

        def healthy(coord: Coordinator) -> set[str]:
            return {
                w["name"]
                for w in get(coord, "/api/admin/workers")
                if w["status"] == "online"
                and any(s["name"] == "fake" and s["healthy"] for s in w["services"])
            }

        wait_for("six healthy workers, seen from B", lambda: healthy(b) >= set(plan), 180)

        def tunnels(coords: list[Coordinator]) -> list[float]:
            return [metric(x, "rma_tunnels_connected") for x in coords]

        wait_for("three tunnels, one on A", lambda: (t := tunnels(cluster))[0] >= 1 and sum(
            t
        ) == 3)  # fmt: skip
        on_a = tunnels(cluster)[0]
        wait_for("the silent worker judged", lambda: names(b).get("silent") == "offline", 60)
        judged = [e for e in get(c, "/api/admin/events", limit=1000) if e["kind"] == "offline"]
        assert [e["data"]["coordinator"] for e in judged] == ["coord-a"], judged  # one sweeper
        silent_id = _id(b, "silent")

        with a.admin() as http:
            key = http.post("/api/admin/keys", json={"name": "load", "rpm": 0}).json()["key"]
        with Load(lb, key) as load:
            wait_for("load through the balancer", lambda: load.answered() >= 50, 120)
            a.stop(signal.SIGKILL)
            killed_at = time.monotonic()
            wait_for("a new leader", lambda: "leader" in (
                readyz(b).get("role"), readyz(c).get("role")
            ), FAILOVER_BOUND)  # fmt: skip
            failover = time.monotonic() - killed_at
            wait_for("the tunnels re-attached", lambda: sum(tunnels([b, c])) == 3, REATTACH_BOUND)
            reattach = time.monotonic() - killed_at
            # the load goes on through the survivors
            wait_for("answers after the kill", lambda: load.answered(killed_at + 2) >= 100, 120)

            # The worker whose tunnel was on the leader serves through both survivors again (its
            # new tunnel lifted the cool-down a survivor gave it when relaying to the dead one).
            def via() -> set[str]:
                with load.lock:
                    return {
                        o.backend
                        for o in load.outcomes
                        if o.worker == "tunnel-1" and o.sent > killed_at + reattach
                    }

            wait_for("tunnel-1 answering through B and C", lambda: via() == {
                "coord-b", "coord-c"
            }, 60)  # fmt: skip
        survivors_lead = [metric(x, "rma_leader") for x in (b, c)]
        assert sorted(survivors_lead) == [0.0, 1.0], survivors_lead

        # Past one whole offline window after the kill: nobody judged for it, no agent told to go.
        time.sleep(max(0.0, OFFLINE_AFTER + 2 - (time.monotonic() - killed_at)))
        for coord in (b, c):
            seen = names(coord)
            assert all(seen[n] == "online" for n in plan), seen
        judged = [
            e
            for e in get(b, "/api/admin/events", limit=1000)
            if e["kind"] in ("offline", "removed") and e["worker_id"] != silent_id
        ]
        assert judged == []
        assert all(p.poll() is None for p in procs.values())
        for name in plan:
            assert "removed by the operator" not in (tmp_path / f"{name}.log").read_text()
        # The live stream of C showed what A raised: the sweeper's verdict on the silent worker.
        wait_for("A's event on C's stream", lambda: any(
            e["kind"] == "offline" and e["worker_id"] == silent_id for e in follower.events
        ), 10)  # fmt: skip

    # Count: every request sent, answered or failed; each failure found in HAProxy's log.
    outcomes = load.outcomes
    failed = [o for o in outcomes if o.error is not None]
    served_by: dict[str, tuple[str, str, str]] = {}

    def logged() -> bool:
        for line in lb_log.read_text(errors="replace").splitlines():
            if m := LOG_LINE.match(line):
                served_by[m["rid"]] = (m["server"], m["status"], m["term"])
        return all(o.rid in served_by for o in failed)

    wait_for(f"HAProxy to log every failed request: {failed}", logged, 10)
    # In flight on the killed one: HAProxy had sent it there and was waiting for (H) or reading
    # (D) the answer when the connection died.
    on_killed = [
        o
        for o in failed
        if served_by[o.rid][0] == "coord-a" and served_by[o.rid][2][1:2] in ("H", "D")
    ]
    others = [(o, served_by[o.rid]) for o in failed if o not in on_killed]
    after = [served_by.get(o.rid, ("?",))[0] for o in outcomes if o.sent > killed_at + 2]
    by_worker = [o.worker for o in outcomes if o.error is None]
    moved = [o.done for o in outcomes if o.worker == "tunnel-1" and o.sent > killed_at]
    back = f"{(min(moved) - killed_at) * 1000:.0f} ms" if moved else "not within the load"
    print(
        f"\nsent {len(outcomes)}, answered {len(outcomes) - len(failed)}, failed {len(failed)}"
        f" ({len(on_killed)} in flight on the killed leader: "
        f"{sorted({served_by[o.rid][1:] for o in on_killed})}), other failures {len(others)}; "
        f"registration spread at most {max(high for _, high in spread.values()) * 1000:.0f} ms "
        f"(at least {max(low for low, _ in spread.values()) * 1000:.0f} ms); "
        f"failover {failover * 1000:.0f} ms; tunnels re-attached after {reattach * 1000:.0f} ms "
        f"({on_a:.0f} was on the leader); answered after the kill by "
        f"{ {s: after.count(s) for s in sorted(set(after))} }; answers by worker "
        f"{ {w: by_worker.count(w) for w in sorted(set(by_worker))} }; the worker whose tunnel "
        f"was on the leader answered again after {back}"
    )
    assert others == []
    assert len(on_killed) <= CLIENTS  # at most one request in flight per client
    assert "coord-a" not in after  # the balancer sends nothing more to the dead one


def test_the_follow_stream_shows_an_event_that_commits_after_a_later_one(
    start_cluster: Callable[..., list[Coordinator]],
    catalog: Path,
    database_url: str,
) -> None:
    """Another coordinator's event reaches B's followers a notice after it commits, and may
    commit after B wrote a later id: B's stream still shows it (it used to skip every id at or
    below the last one it had shown)."""
    from sqlalchemy import create_engine, text
    from sqlmodel import Session

    from rma.coordinator.cluster.changes import CHANNEL, EVENT, encode
    from rma.coordinator.tables import Event

    (b,) = start_cluster(("coord-b",), catalog)
    engine = create_engine(database_url)  # the test writes as "coordinator A" would
    try:
        with EventFollower(b) as follower, Session(engine) as s:
            early = Event(ts=time.time(), kind="test_early", message="written first", data={})
            s.add(early)
            s.flush()  # its id is taken; the row is not committed yet
            with b.admin() as http:  # B writes (and shows) a later id meanwhile
                assert http.post("/api/admin/keys", json={"name": "later"}).status_code == 201
            wait_for("B's own event", lambda: any(
                e["kind"] == "key_created" for e in follower.events
            ), 30)  # fmt: skip
            later = next(e["id"] for e in follower.events if e["kind"] == "key_created")
            assert early.id is not None and early.id < later
            payload = encode("coord-a", EVENT, str(early.id))
            s.execute(text("SELECT pg_notify(:c, :p)"), {"c": CHANNEL, "p": payload})
            s.commit()
            wait_for("the earlier id on B's stream", lambda: any(
                e["id"] == early.id and e["kind"] == "test_early" for e in follower.events
            ), 30)  # fmt: skip
            assert [e["id"] for e in follower.events].count(later) == 1  # and nothing twice
    finally:
        engine.dispose()
