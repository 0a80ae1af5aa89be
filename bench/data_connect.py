"""The data tier's forwarder against a direct connection: ``python -m bench.data_connect``.

Starts a real coordinator and a real agent (``rma worker join --transport tunnel --runtime
process``) that runs the system's Redis and PostgreSQL, and ``rma connect`` for each; then
measures the same client work twice, straight to the service's port on the worker and through
``rma connect`` (client -> local port -> WebSocket -> coordinator -> tunnel stream -> agent ->
service):

- Redis ``PING`` one at a time on one connection (round-trip latency, p50/p99);
- Redis ``PING`` on 8 connections at once (requests per second);
- Redis ``GET`` of a 4 MiB value (throughput, MB/s);
- ``pgbench -S`` (select-only) with 4 clients, if pgbench is installed (TPS, mean latency).

Everything runs on this machine, so "direct" has no network at all: the figures are the
forwarder's own cost.  Results: a table on stdout, every figure in ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from rma.agent.programs import find_program


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _catalog() -> str:
    from rma.catalog import load_catalog

    return "\n".join(
        f'[services.{n}]\nlabels = {{ never = "1" }}\n'
        for n in load_catalog()
        if n not in ("postgres", "redis")
    )


class Stack:
    """Coordinator + agent + two ``rma connect`` processes, in a temporary folder."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.procs: list[subprocess.Popen[bytes]] = []
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"

    def _spawn(self, name: str, args: list[str], **kw: Any) -> subprocess.Popen[bytes]:
        log = open(self.root / f"{name}.log", "ab")  # noqa: SIM115 - the child keeps it
        proc = subprocess.Popen(
            [sys.executable, "-m", "rma", *args], stderr=log, stdout=kw.pop("stdout", log), **kw
        )
        self.procs.append(proc)
        return proc

    def start(self) -> None:
        catalog = self.root / "catalog.toml"
        catalog.write_text(_catalog())
        coord_dir = self.root / "coord"
        self._spawn(
            "coordinator",
            ["coordinator", "serve", "--port", str(self.port), "--data-dir", str(coord_dir),
             "--catalog", str(catalog), "--log-level", "warning"],
        )  # fmt: skip
        self._wait(lambda: httpx.get(self.url + "/healthz", timeout=1).status_code == 200, 30)
        admin = (coord_dir / "admin.key").read_text().strip()
        self.admin = httpx.Client(
            base_url=self.url, headers={"authorization": f"Bearer {admin}"}, timeout=10
        )
        token = self.admin.post("/api/admin/tokens", json={"ttl": 600, "uses": 2}).json()["token"]
        body = {"name": "bench", "rpm": 0, "services": ["postgres", "redis"]}
        self.key = self.admin.post("/api/admin/keys", json=body).json()["key"]
        self._spawn(
            "agent",
            ["worker", "join", "--coordinator", self.url, "--token", token, "--name", "bench",
             "--transport", "tunnel", "--runtime", "process", "--catalog", str(catalog),
             "--data-dir", str(self.root / "agent")],
            env={**os.environ, "RMA_HEARTBEAT_INTERVAL": "1"},
        )  # fmt: skip
        self._wait(lambda: self.endpoint("postgres") and self.endpoint("redis"), 120)

    def endpoint(self, service: str) -> int | None:
        for w in self.admin.get("/api/admin/workers").json():
            for s in w["services"]:
                if s["name"] == service and s["healthy"] and s.get("endpoint"):
                    return int(s["endpoint"].rsplit(":", 1)[1])
        return None

    def connect(self, service: str) -> dict[str, Any]:
        proc = self._spawn(
            f"connect-{service}",
            ["connect", service, "--json", "--coordinator", self.url, "--api-key", self.key],
            stdout=subprocess.PIPE,
        )
        assert proc.stdout is not None
        info: dict[str, Any] = json.loads(proc.stdout.readline())
        return info

    @staticmethod
    def _wait(cond: Any, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if cond():
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RuntimeError("the stack did not come up (see the logs in the work folder)")

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
        for proc in reversed(self.procs):
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
            if proc.stdout is not None:
                proc.stdout.close()


def redis_figures(port: int, pings: int, seconds: float) -> dict[str, float]:
    import redis

    r = redis.Redis(host="127.0.0.1", port=port)
    r.ping()
    lat = []
    for _ in range(pings):
        t = time.perf_counter()
        r.ping()
        lat.append(time.perf_counter() - t)
    lat.sort()
    out = {
        "ping_p50_ms": statistics.median(lat) * 1000,
        "ping_p99_ms": lat[int(len(lat) * 0.99)] * 1000,
    }
    counts = [0] * 8
    stop = time.perf_counter() + seconds

    def hammer(i: int) -> None:
        c = redis.Redis(host="127.0.0.1", port=port)
        while time.perf_counter() < stop:
            c.ping()
            counts[i] += 1
        c.close()

    threads = [threading.Thread(target=hammer, args=(i,)) for i in range(8)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out["ping_c8_per_s"] = sum(counts) / (time.perf_counter() - t0)
    value = os.urandom(4 * 1024 * 1024)
    r.set("bench:big", value)
    t0 = time.perf_counter()
    n = 0
    while time.perf_counter() - t0 < seconds:
        assert r.get("bench:big") == value
        n += 1
    out["get_4mib_mb_per_s"] = n * len(value) / (time.perf_counter() - t0) / 1e6
    r.close()
    return out


def pgbench_figures(port: int, seconds: int) -> dict[str, float] | None:
    pgbench = shutil.which("pgbench") or find_program("pgbench")
    if pgbench is None:
        return None
    env = {**os.environ, "PGPASSWORD": "rma"}
    base = [pgbench, "-h", "127.0.0.1", "-p", str(port), "-U", "postgres"]
    res = subprocess.run(
        [*base, "-c", "4", "-j", "2", "-S", "-T", str(seconds), "postgres"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    tps = re.search(r"tps = ([\d.]+)", res.stdout)
    lat = re.search(r"latency average = ([\d.]+) ms", res.stdout)
    if tps is None or lat is None:
        raise RuntimeError(f"pgbench said: {res.stdout[-500:]}")
    return {"pgbench_S_c4_tps": float(tps.group(1)), "pgbench_S_c4_latency_ms": float(lat.group(1))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pings", type=int, default=2000, help="Sequential PINGs per target.")
    ap.add_argument("--seconds", type=float, default=5.0, help="Seconds per timed run.")
    ap.add_argument("--out", type=Path, default=Path("bench/data-results.json"))
    args = ap.parse_args(argv)
    for program in ("initdb", "redis-server"):
        if find_program(program) is None:
            print(f"error: {program} is not installed", file=sys.stderr)
            return 1
    with tempfile.TemporaryDirectory(prefix="rma-bench-data-") as tmp:
        root = Path(tmp)
        stack = Stack(root)
        try:
            stack.start()
            redis_direct, pg_direct = stack.endpoint("redis"), stack.endpoint("postgres")
            if not (redis_direct and pg_direct):
                raise RuntimeError("the services report no endpoint")
            redis_fwd = int(stack.connect("redis")["port"])
            pg_fwd = int(stack.connect("postgres")["port"])
            pgbench = shutil.which("pgbench") or find_program("pgbench")
            if pgbench:
                subprocess.run(
                    [pgbench, "-i", "-s", "1", "-q", "-h", "127.0.0.1", "-p", str(pg_direct),
                     "-U", "postgres", "postgres"],
                    env={**os.environ, "PGPASSWORD": "rma"}, capture_output=True, check=True,
                )  # fmt: skip
            results: dict[str, dict[str, float]] = {}
            for target, (rport, pport) in (
                ("direct", (redis_direct, pg_direct)),
                ("rma connect", (redis_fwd, pg_fwd)),
            ):
                figures = redis_figures(rport, args.pings, args.seconds)
                figures |= pgbench_figures(pport, int(args.seconds)) or {}
                results[target] = figures
        finally:
            stack.stop()
    names = list(results["direct"])
    print(f"{'figure':28} {'direct':>12} {'rma connect':>12}")
    for name in names:
        print(f"{name:28} {results['direct'][name]:12.2f} {results['rma connect'][name]:12.2f}")
    doc = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "load_average": os.getloadavg(),
        "args": {"pings": args.pings, "seconds": args.seconds},
        "results": results,
    }
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
