"""Capacity: how many workers one coordinator (or two) holds, heartbeating like real agents.

``python -m bench.capacity [--sizes 10,1000,5000,10000] [--interval 30] [--setups sqlite,pg,ha]``
(or ``nox -s capacity -- ...``) starts, on this machine, a fast fake OpenAI backend
(``bench/fake_backend.py``) and, per setup:

- ``sqlite``: one real coordinator (``rma coordinator serve``) on SQLite;
- ``pg``: one on PostgreSQL (``--database-url`` or ``RMA_BENCH_DATABASE_URL``; its ``public``
  schema is dropped and made again: give it a database of its own);
- ``ha``: two on that PostgreSQL behind HAProxy (round robin, like ``containers/haproxy.cfg``).

Then it grows a pool of simulated workers to each size in turn: real HTTP registration with a
join token (``POST /api/worker/register``, fabricated capabilities, nothing they can run), then
real heartbeats (``POST /api/worker/heartbeat`` with their credential) every ``--interval``
seconds with +/-10 % jitter, each worker starting at a random phase.  One of them is a real
serving worker: its heartbeats report the fake backend as its healthy ``fast`` service, and a
client sends it one request at a time (``POST /v1/embeddings`` through the gateway) while the
pool heartbeats.  The simulated workers share ``--connections`` keep-alive connections (a small
raw HTTP/1.1 client, so that the client's own cost stays out of the latencies).

Per size it reports: heartbeats/s, heartbeat p50/p99 (sent to answered, measured over one
interval after one interval of warm-up), each coordinator's CPU over that interval (from
``/proc``, per process) and RSS, the registration rate and the coordinators' CPU time per
registration, then the gateway's p50 at c=1 over ``--gateway-seconds`` (the pool still
heartbeating), and the machine's load average.  Results go to ``--out`` (JSON) and a table.
``--profile DIR`` runs the coordinators under ``bench/capacity_sampler.py``: their busy stacks,
per thread kind, over the last size's measurement window.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
BACKEND = ROOT / "bench" / "fake_backend.py"
SAMPLER = ROOT / "bench" / "capacity_sampler.py"
console = Console(stderr=True)
TICK = os.sysconf("SC_CLK_TCK")

CATALOG = """
[services.fast]
description = "fake backend answering at once"
tier = 3
kind = "openai"
models = ["fast-chat", "fast-embed"]
"""

EMBED = json.dumps({"model": "fast-embed", "input": ["The quick brown fox."]}).encode()


# --- a small HTTP/1.1 client ----------------------------------------------------------------------


class Conn:
    """One keep-alive HTTP/1.1 connection; reopened when the server closed it."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def _open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None

    async def request(self, path: str, body: bytes, auth: str) -> tuple[int, bytes]:
        head = (
            f"POST {path} HTTP/1.1\r\nhost: {self.host}:{self.port}\r\n"
            f"content-type: application/json\r\ncontent-length: {len(body)}\r\n"
            f"authorization: Bearer {auth}\r\n\r\n"
        ).encode()
        for attempt in (0, 1):
            fresh = self.writer is None
            if fresh:
                await self._open()
            assert self.reader is not None
            assert self.writer is not None
            try:
                self.writer.write(head + body)
                return await self._response(self.reader)
            except (ConnectionError, asyncio.IncompleteReadError):
                self.close()
                if fresh or attempt:
                    raise
        raise AssertionError("unreachable")

    async def _response(self, reader: asyncio.StreamReader) -> tuple[int, bytes]:
        raw = await reader.readuntil(b"\r\n\r\n")
        lines = raw.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            if ":" in line:
                k, v = line.split(":", 1)
                headers[k.strip().lower()] = v.strip()
        if headers.get("transfer-encoding") == "chunked":
            data = b""
            while True:
                size = int((await reader.readuntil(b"\r\n")).strip(), 16)
                chunk = await reader.readexactly(size + 2)
                if size == 0:
                    break
                data += chunk[:-2]
        else:
            data = await reader.readexactly(int(headers.get("content-length", "0")))
        if headers.get("connection") == "close":
            self.close()
        return status, data


class Pool:
    """A fixed number of connections shared by many simulated workers."""

    def __init__(self, host: str, port: int, size: int) -> None:
        self.free: asyncio.Queue[Conn] = asyncio.Queue()
        for _ in range(size):
            self.free.put_nowait(Conn(host, port))

    async def post(self, path: str, body: bytes, auth: str) -> tuple[int, bytes, float]:
        """Status, body and seconds from sending to the answer (not counting the wait for a
        free connection)."""
        conn = await self.free.get()
        try:
            start = time.perf_counter()
            status, data = await conn.request(path, body, auth)
            return status, data, time.perf_counter() - start
        except BaseException:
            conn.close()
            raise
        finally:
            self.free.put_nowait(conn)

    def close(self) -> None:
        while not self.free.empty():
            self.free.get_nowait().close()


# --- simulated workers ----------------------------------------------------------------------------


@dataclass
class Sim:
    name: str
    credential: str = ""
    body: bytes = b"{}"


@dataclass
class Beats:
    """Heartbeat answers: (when answered, seconds it took); errors by status."""

    samples: list[tuple[float, float]] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)


def caps(rng: random.Random) -> dict[str, Any]:
    return {
        "cpu_cores": rng.choice((2, 4, 8, 16)),
        "memory_mb": rng.choice((4096, 8192, 16384, 32768)),
        "disk_free_mb": rng.randrange(10_000, 500_000),
        "os": "linux",
        "arch": rng.choice(("x86_64", "aarch64")),
    }


async def register(pool: Pool, sim: Sim, token: str, extra: dict[str, Any]) -> float:
    body = {"token": token, "name": sim.name, "capabilities": caps(random.Random(sim.name))}
    body.setdefault("transport", "direct")
    body["runnable"] = []
    body.update(extra)
    status, data, took = await pool.post("/api/worker/register", json.dumps(body).encode(), "-")
    if status != 201:
        raise SystemExit(f"registration of {sim.name} failed: {status} {data[:300]!r}")
    sim.credential = json.loads(data)["credential"]
    return took


async def heartbeat_forever(pool: Pool, sim: Sim, interval: float, beats: Beats) -> None:
    await asyncio.sleep(random.uniform(0, interval))
    while True:
        started = time.monotonic()
        try:
            status, data, took = await pool.post("/api/worker/heartbeat", sim.body, sim.credential)
        except (OSError, asyncio.IncompleteReadError) as exc:
            beats.errors[type(exc).__name__] = beats.errors.get(type(exc).__name__, 0) + 1
        else:
            if status == 200:
                beats.samples.append((time.monotonic(), took))
                if b'"credential":"' in data:
                    renewed = json.loads(data).get("credential")
                    if renewed:
                        sim.credential = renewed
            else:
                beats.errors[str(status)] = beats.errors.get(str(status), 0) + 1
        delay = interval * random.uniform(0.9, 1.1) - (time.monotonic() - started)
        await asyncio.sleep(max(0.0, delay))


async def gateway_c1(pool: Pool, key: str, until: float) -> list[float]:
    out = []
    while time.monotonic() < until:
        status, _data, took = await pool.post("/v1/embeddings", EMBED, key)
        if status == 200:
            out.append(took)
    return out


# --- processes ------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, proc: subprocess.Popen[bytes], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited with {proc.returncode}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=1).status_code == 200:
                return
        time.sleep(0.2)
    raise SystemExit(f"{what} did not start")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def reset_database(url: str) -> None:
    from sqlalchemy import create_engine, text

    engine = create_engine(url)
    try:
        with engine.begin() as c:
            c.execute(text("DROP SCHEMA public CASCADE"))
            c.execute(text("CREATE SCHEMA public"))
    finally:
        engine.dispose()


HAPROXY = """global
    maxconn 4000
defaults
    mode http
    timeout connect 5s
    timeout client 300s
    timeout server 300s
    timeout http-keep-alive 60s
    option http-keep-alive
frontend rma
    bind 127.0.0.1:{port}
    default_backend coordinators
backend coordinators
    balance roundrobin
    option httpchk GET /readyz
    http-check expect status 200
    default-server inter 1s fall 2 rise 2
{servers}
"""


@dataclass
class Stack:
    url: str
    coordinators: list[subprocess.Popen[bytes]]
    admin_key: str
    balancer: subprocess.Popen[bytes] | None = None


@contextmanager
def stack(
    setup: str, tmp: Path, interval: float, db_url: str | None, profile: Path | None = None
) -> Iterator[Stack]:
    procs: list[subprocess.Popen[bytes]] = []
    catalog = tmp / "catalog.toml"
    catalog.write_text(CATALOG)
    if setup != "sqlite":
        assert db_url is not None
        reset_database(db_url)
    env = {
        **os.environ,
        "RMA_HEARTBEAT_INTERVAL": str(interval),
        "RMA_OFFLINE_AFTER": "3600",
        "RMA_REMOVE_AFTER": "7200",
        "RMA_WORKER_CAPACITY": "1024",
    }
    try:
        coords, urls = [], []
        for i in range(2 if setup == "ha" else 1):
            port = free_port()
            data = tmp / f"{setup}-{i}"
            cmd = [sys.executable, "-m", "rma", "coordinator", "serve", "--port", str(port)]
            if profile is not None:
                profile.mkdir(parents=True, exist_ok=True)
                cmd[1:1] = [str(SAMPLER), str(profile / f"{setup}-{i}.txt")]
            cmd += ["--data-dir", str(data), "--catalog", str(catalog), "--log-level", "warning"]
            if setup != "sqlite":
                cmd += ["--database-url", str(db_url)]
            log = open(tmp / f"{setup}-{i}.log", "wb")  # noqa: SIM115
            p = subprocess.Popen(
                cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**env, "RMA_COORDINATOR_NAME": f"c{i}"},
            )
            procs.append(p)
            coords.append(p)
            urls.append(f"http://127.0.0.1:{port}")
            wait_http(urls[-1] + "/readyz", p, f"coordinator {i}")
        admin_key = (tmp / f"{setup}-0" / "admin.key").read_text().strip()
        balancer = None
        url = urls[0]
        if setup == "ha":
            port = free_port()
            servers = "\n".join(
                f"    server c{i} {u.removeprefix('http://')} check" for i, u in enumerate(urls)
            )
            cfg = tmp / "haproxy.cfg"
            cfg.write_text(HAPROXY.format(port=port, servers=servers))
            balancer = subprocess.Popen(
                ["haproxy", "-f", str(cfg), "-db"], stdout=subprocess.DEVNULL
            )
            procs.append(balancer)
            url = f"http://127.0.0.1:{port}"
            wait_http(url + "/readyz", balancer, "haproxy")
        yield Stack(url, coords, admin_key, balancer)
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(15)
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


@contextmanager
def backend() -> Iterator[str]:
    port = free_port()
    cmd = [sys.executable, str(BACKEND), "--port", str(port), "--name", "fast", "--dim", "8"]
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", p, "the fake backend")
        yield f"http://127.0.0.1:{port}"
    finally:
        p.terminate()
        p.wait(10)


# --- one setup ------------------------------------------------------------------------------------


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


@dataclass
class Row:
    setup: str
    workers: int
    heartbeats_per_s: float
    heartbeat_p50_ms: float
    heartbeat_p99_ms: float
    heartbeat_max_ms: float
    heartbeat_errors: dict[str, int]
    coordinator_cpu_pct: list[float]
    coordinator_rss_mb: list[float]
    registrations: int
    registrations_per_s: float
    registration_p50_ms: float
    registration_cpu_ms: float
    gateway_p50_ms: float
    gateway_requests: int
    load_average: list[float]
    balancer_cpu_pct: float | None = None


async def run_setup(setup: str, st: Stack, backend_url: str, args: argparse.Namespace) -> list[Row]:
    host, port = st.url.removeprefix("http://").split(":")
    admin = {"authorization": f"Bearer {st.admin_key}"}
    async with httpx.AsyncClient(base_url=st.url, headers=admin, timeout=30) as c:
        r = await c.post("/api/admin/keys", json={"name": "bench", "rpm": 0})
        r.raise_for_status()
        key = r.json()["key"]
        r = await c.post("/api/admin/tokens", json={"ttl": 86400, "uses": None})
        r.raise_for_status()
        token = r.json()["token"]
    pool = Pool(host, int(port), args.connections)
    client = Pool(host, int(port), 1)
    beats = Beats()
    tasks: list[asyncio.Task[None]] = []
    rows: list[Row] = []
    sims: list[Sim] = []
    try:
        serving = Sim("serving-worker")
        await register(pool, serving, token, {"runnable": ["fast"]})
        services = [{"name": "fast", "state": "running", "healthy": True, "endpoint": backend_url}]
        serving.body = json.dumps({"services": services}).encode()
        status, data, _ = await pool.post("/api/worker/heartbeat", serving.body, serving.credential)
        if status != 200:
            raise SystemExit(f"the serving worker's heartbeat failed: {status} {data[:300]!r}")
        tasks.append(asyncio.create_task(heartbeat_forever(pool, serving, args.interval, beats)))
        deadline = time.monotonic() + 30
        while (await client.post("/v1/embeddings", EMBED, key))[0] != 200:
            if time.monotonic() > deadline:
                raise SystemExit("the gateway does not route to the serving worker")
            await asyncio.sleep(0.2)
        for size in args.sizes:
            want = size - 1 - len(sims)
            new = [Sim(f"sim-{len(sims) + i}") for i in range(max(0, want))]
            reg_times: list[float] = []
            cpu0 = [cpu_seconds(p.pid) for p in st.coordinators]
            t0 = time.monotonic()
            with Progress(
                TextColumn(f"{setup}: registering to {size:,}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=console,
                transient=True,
            ) as bar:
                task = bar.add_task("register", total=len(new))
                queue = list(new)

                async def registrar(
                    q: list[Sim] = queue,
                    b: Progress = bar,
                    t: Any = task,
                    rt: list[float] = reg_times,
                ) -> None:
                    while q:
                        sim = q.pop()
                        rt.append(await register(pool, sim, token, {}))
                        tasks.append(
                            asyncio.create_task(heartbeat_forever(pool, sim, args.interval, beats))
                        )
                        b.advance(t)

                await asyncio.gather(*(registrar() for _ in range(args.register_concurrency)))
            reg_wall = time.monotonic() - t0
            reg_cpu = sum(cpu_seconds(p.pid) for p in st.coordinators) - sum(cpu0)
            sims += new
            with Progress(
                TextColumn(f"{setup}: {size:,} workers, {{task.description}}"),
                BarColumn(),
                TimeElapsedColumn(),
                console=console,
                transient=True,
            ) as bar:
                task = bar.add_task("warming up", total=args.interval * 2)
                for _ in range(int(args.interval)):
                    await asyncio.sleep(1)
                    bar.advance(task, 1)
                if args.profile is not None and size == args.sizes[-1]:
                    for p in st.coordinators:
                        p.send_signal(signal.SIGUSR1)
                w0 = time.monotonic()
                cpu0 = [cpu_seconds(p.pid) for p in st.coordinators]
                lb0 = cpu_seconds(st.balancer.pid) if st.balancer else 0.0
                bar.update(task, description="measuring")
                while time.monotonic() < w0 + args.interval:
                    await asyncio.sleep(1)
                    bar.advance(task, 1)
                w1 = time.monotonic()
                if args.profile is not None and size == args.sizes[-1]:
                    for p in st.coordinators:
                        p.send_signal(signal.SIGUSR2)
                cpu1 = [cpu_seconds(p.pid) for p in st.coordinators]
                lb1 = cpu_seconds(st.balancer.pid) if st.balancer else 0.0
                bar.update(task, description="gateway at c=1")
                gateway = await gateway_c1(client, key, time.monotonic() + args.gateway_seconds)
            window = [took for when, took in beats.samples if w0 <= when <= w1]
            if args.profile is not None:  # when the slow ones were answered (a stall or noise)
                slow = [(round(when - w0, 3), round(took * 1e3, 1)) for when, took in beats.samples]
                (args.profile / f"{setup}-{size}-beats.json").write_text(json.dumps(slow))
            beats.samples = [s for s in beats.samples if s[0] > w1]
            row = Row(
                setup=setup,
                workers=len(sims) + 1,
                heartbeats_per_s=round(len(window) / (w1 - w0), 1),
                heartbeat_p50_ms=round(pct(window, 0.5) * 1e3, 2),
                heartbeat_p99_ms=round(pct(window, 0.99) * 1e3, 2),
                heartbeat_max_ms=round(max(window, default=0.0) * 1e3, 2),
                heartbeat_errors=dict(beats.errors),
                coordinator_cpu_pct=[
                    round(100 * (b - a) / (w1 - w0), 1) for a, b in zip(cpu0, cpu1, strict=True)
                ],
                coordinator_rss_mb=[round(rss_mb(p.pid), 1) for p in st.coordinators],
                registrations=len(new),
                registrations_per_s=round(len(new) / reg_wall, 1) if new else 0.0,
                registration_p50_ms=round(pct(reg_times, 0.5) * 1e3, 2) if new else 0.0,
                registration_cpu_ms=round(reg_cpu / len(new) * 1e3, 2) if new else 0.0,
                gateway_p50_ms=round(pct(gateway, 0.5) * 1e3, 3),
                gateway_requests=len(gateway),
                load_average=[round(x, 2) for x in os.getloadavg()],
                balancer_cpu_pct=(round(100 * (lb1 - lb0) / (w1 - w0), 1) if st.balancer else None),
            )
            beats.errors.clear()
            rows.append(row)
            console.print(json.dumps(asdict(row)))
            partial = args.out.with_suffix(".partial.json")  # kept if the run is cut short
            partial.write_text(json.dumps([asdict(r) for r in rows], indent=2) + "\n")
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        pool.close()
        client.close()
    return rows


def table(rows: list[Row]) -> Table:
    t = Table(title="capacity")
    for col in (
        "setup", "workers", "hb/s", "hb p50", "hb p99", "coord CPU", "RSS MB",
        "reg/s", "reg CPU", "gw p50 c=1", "load",
    ):  # fmt: skip
        t.add_column(col)
    for r in rows:
        t.add_row(
            r.setup,
            f"{r.workers:,}",
            f"{r.heartbeats_per_s:g}",
            f"{r.heartbeat_p50_ms:g} ms",
            f"{r.heartbeat_p99_ms:g} ms",
            " + ".join(f"{c:g} %" for c in r.coordinator_cpu_pct),
            " + ".join(f"{m:.0f}" for m in r.coordinator_rss_mb),
            f"{r.registrations_per_s:g}",
            f"{r.registration_cpu_ms:g} ms",
            f"{r.gateway_p50_ms:g} ms",
            " ".join(f"{x:g}" for x in r.load_average),
        )
    return t


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10,1000,5000,10000", help="pool sizes, in order")
    ap.add_argument("--interval", type=float, default=30.0, help="heartbeat interval (s)")
    ap.add_argument(
        "--setups", help="of sqlite, pg, ha (default: all three with a database URL, else sqlite)"
    )
    ap.add_argument("--database-url", default=os.environ.get("RMA_BENCH_DATABASE_URL"))
    ap.add_argument("--connections", type=int, default=32, help="shared worker connections")
    ap.add_argument("--register-concurrency", type=int, default=4)
    ap.add_argument(
        "--gateway-seconds", type=float, default=5.0, help="c=1 gateway run per size (s)"
    )
    ap.add_argument(
        "--profile",
        type=Path,
        help="sample the coordinators' stacks (bench/capacity_sampler.py) into DIR",
    )
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "capacity-results.json")
    args = ap.parse_args(argv)
    args.sizes = [int(x) for x in args.sizes.split(",")]
    if args.setups is None:
        args.setups = "sqlite,pg,ha" if args.database_url else "sqlite"
    setups = args.setups.split(",")
    if any(s != "sqlite" for s in setups) and not args.database_url:
        console.print("error: pg and ha need --database-url (or RMA_BENCH_DATABASE_URL)")
        return 2
    if "ha" in setups and shutil.which("haproxy") is None:
        console.print("error: the ha setup needs haproxy on the PATH")
        return 2
    rows: list[Row] = []
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="rma-capacity-") as d, backend() as backend_url:
        for setup in setups:
            tmp = Path(d) / setup
            tmp.mkdir()
            with stack(setup, tmp, args.interval, args.database_url, args.profile) as st:
                rows += asyncio.run(run_setup(setup, st, backend_url, args))
    Console(width=200).print(table(rows))
    result = {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "started": started,
        "seconds": round(time.time() - started),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "rows": [asdict(r) for r in rows],
    }
    result["args"].pop("database_url", None)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".partial.json").unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
