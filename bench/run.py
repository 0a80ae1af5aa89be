"""The gateway benchmark: the coordinator's cost against calling the backend directly.

``python -m bench.run`` (or ``nox -s bench``) starts, on this machine, a fast fake OpenAI backend
(``bench/fake_backend.py``), a real coordinator (``rma coordinator serve``) with one direct worker
pointing at it, and runs ``wrk`` (Lua scripts for the POST bodies) against the backend directly
and through the gateway, in one run, for chat, streamed chat and embeddings:

- backend answering in 50 ms, 32 connections: gateway throughput / direct throughput (goal >= 0.9)
- backend answering in 50 ms, 1 connection: p50 added by the gateway (goal <= 2 ms)
- backend answering at once, 32 connections: the coordinator's requests/s on one core and its CPU
  time per request (read from the coordinator process with psutil before and after; goal <= 1 ms)

With two or more CPUs, the coordinator is pinned to the first one and the backend and ``wrk`` to
the others.  Results go to stdout (a table) and to ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
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
import psutil
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
BACKEND = ROOT / "bench" / "fake_backend.py"
console = Console(stderr=True)

CATALOG = """
[services.slow]
description = "fake backend answering in 50 ms"
tier = 3
kind = "openai"
models = ["slow-chat", "slow-embed"]
[services.fast]
description = "fake backend answering at once"
tier = 3
kind = "openai"
models = ["fast-chat", "fast-embed"]
"""

CHAT = {"messages": [{"role": "user", "content": "Say hello in one short sentence."}]}
EMBED = {"input": ["The quick brown fox jumps over the lazy dog."]}


@dataclass(frozen=True)
class Workload:
    name: str
    path: str
    body: dict[str, Any]
    kind: str  # "chat" or "embed" (which model of the service)


WORKLOADS = (
    Workload("chat", "/v1/chat/completions", {**CHAT, "max_tokens": 16}, "chat"),
    Workload("stream", "/v1/chat/completions", {**CHAT, "max_tokens": 16, "stream": True}, "chat"),
    Workload("embeddings", "/v1/embeddings", EMBED, "embed"),
)


@dataclass(frozen=True)
class Setup:
    name: str
    service: str  # "slow" or "fast"
    connections: int
    goal: str


SETUPS = (
    Setup("50ms-c32", "slow", 32, "throughput >= 0.9 x direct"),
    Setup("50ms-c1", "slow", 1, "p50 added <= 2 ms"),
    Setup("instant-c32", "fast", 32, "coordinator CPU per request <= 1 ms"),
)


@dataclass
class Run:
    target: str  # "direct" or "gateway"
    requests: int = 0
    rps: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    errors: int = 0
    cpu_ms_per_request: float | None = None


@dataclass
class Result:
    workload: str
    setup: str
    direct: Run
    gateway: Run
    extra: dict[str, float] = field(default_factory=dict)


# --- processes ------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, proc: subprocess.Popen[bytes], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"{what} did not start")


def pin(pid: int, cpus: set[int]) -> None:
    if cpus:
        with contextlib.suppress(AttributeError, psutil.Error):  # no affinity on macOS
            psutil.Process(pid).cpu_affinity(sorted(cpus))


@contextmanager
def processes(tmp: Path, cpus: tuple[set[int], set[int]]) -> Iterator[dict[str, Any]]:
    coord_cpus, other_cpus = cpus
    procs: list[subprocess.Popen[bytes]] = []
    try:
        backends = {}
        for service, delay in (("slow", "0.05"), ("fast", "0")):
            port = free_port()
            p = subprocess.Popen(
                [
                    sys.executable,
                    str(BACKEND),
                    "--port",
                    str(port),
                    "--name",
                    service,
                    "--delay",
                    delay,
                ],
                stdout=subprocess.DEVNULL,
            )
            procs.append(p)
            pin(p.pid, other_cpus)
            wait_http(f"http://127.0.0.1:{port}/health", p, f"the {service} backend")
            backends[service] = f"http://127.0.0.1:{port}"
        catalog = tmp / "catalog.toml"
        catalog.write_text(CATALOG)
        port = free_port()
        env = {
            **os.environ,
            "RMA_WORKER_CAPACITY": "1024",
            "RMA_OFFLINE_AFTER": "3600",
            "RMA_REMOVE_AFTER": "7200",
        }
        log = open(tmp / "coordinator.log", "wb")  # noqa: SIM115
        coord = subprocess.Popen(
            [
                *(sys.executable, "-m", "rma", "coordinator", "serve", "--port", str(port)),
                *("--data-dir", str(tmp / "data"), "--catalog", str(catalog)),
                *("--log-level", "warning"),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        procs.append(coord)
        pin(coord.pid, coord_cpus)
        url = f"http://127.0.0.1:{port}"
        wait_http(url + "/healthz", coord, "the coordinator")
        admin_key = (tmp / "data" / "admin.key").read_text().strip()
        api_key = setup_pool(url, admin_key, backends)
        yield {"url": url, "key": api_key, "backends": backends, "coordinator": coord}
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()


def setup_pool(url: str, admin_key: str, backends: dict[str, str]) -> str:
    admin = {"authorization": f"Bearer {admin_key}"}
    with httpx.Client(base_url=url, headers=admin, timeout=10) as c:
        key = c.post("/api/admin/keys", json={"name": "bench", "rpm": 0}).json()["key"]
        token = c.post("/api/admin/tokens", json={"ttl": 600, "uses": 1}).json()["token"]
    caps = {"cpu_cores": 2, "memory_mb": 4096, "os": "linux", "arch": "x86_64"}
    reg = httpx.post(
        url + "/api/worker/register",
        json={"token": token, "name": "bench", "capabilities": caps, "transport": "direct"},
        timeout=10,
    ).json()
    services = [
        {"name": name, "state": "running", "healthy": True, "endpoint": endpoint}
        for name, endpoint in backends.items()
    ]
    r = httpx.post(
        url + "/api/worker/heartbeat",
        json={"services": services},
        headers={"authorization": f"Bearer {reg['credential']}"},
        timeout=10,
    )
    r.raise_for_status()
    return str(key)


# --- wrk -----------------------------------------------------------------------------------------


def lua_script(path: Path, body: dict[str, Any], api_key: str | None) -> Path:
    lines = [
        'wrk.method = "POST"',
        f"wrk.body = {json.dumps(json.dumps(body))}",
        'wrk.headers["Content-Type"] = "application/json"',
    ]
    if api_key:
        lines.append(f'wrk.headers["Authorization"] = "Bearer {api_key}"')
    path.write_text("\n".join(lines) + "\n")
    return path


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    return float(m.group(1)) * _UNITS[m.group(2)] if m else float("nan")


def parse_wrk(out: str, target: str) -> Run:
    run = Run(target)
    if m := re.search(r"(\d+) requests in", out):
        run.requests = int(m.group(1))
    if m := re.search(r"Requests/sec:\s+([\d.]+)", out):
        run.rps = float(m.group(1))
    if m := re.search(r"50%\s+(\S+)", out):
        run.p50_ms = _ms(m.group(1))
    if m := re.search(r"99%\s+(\S+)", out):
        run.p99_ms = _ms(m.group(1))
    if m := re.search(r"Non-2xx or 3xx responses: (\d+)", out):
        run.errors += int(m.group(1))
    if m := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out):
        run.errors += sum(int(g) for g in m.groups())
    return run


def wrk(url: str, script: Path, connections: int, duration: float, cpus: set[int]) -> str:
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{duration:g}s", "--latency", "-s", str(script)]
    proc = subprocess.Popen([*cmd, url], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    pin(proc.pid, cpus)
    out, _ = proc.communicate(timeout=duration + 60)
    return out.decode()


def cpu_seconds(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return float(t.user + t.system)


def check_answer(url: str, key: str | None, w: Workload, model: str) -> None:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    r = httpx.post(url + w.path, json={**w.body, "model": model}, headers=headers, timeout=10)
    if r.status_code != 200 or (b"[DONE]" not in r.content and b'"usage"' not in r.content):
        raise SystemExit(f"{url}{w.path} answered {r.status_code}: {r.text[:300]}")


# --- the run -------------------------------------------------------------------------------------


def split_cpus() -> tuple[set[int], set[int]]:
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:
        return set(), set()
    if len(cpus) < 2:
        return set(), set()
    return {cpus[0]}, set(cpus[1:])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Gateway vs direct benchmark (wrk).")
    ap.add_argument("--duration", type=float, default=5.0, help="seconds per wrk run")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results.json")
    ap.add_argument("--only", default="", help="comma-separated workloads (chat,stream,embeddings)")
    args = ap.parse_args(argv)
    if shutil.which("wrk") is None:
        console.print("[red]error:[/red] wrk is not installed (apt-get install wrk)")
        return 1
    workloads = [w for w in WORKLOADS if not args.only or w.name in args.only.split(",")]
    coord_cpus, other_cpus = split_cpus()
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="rma-bench-") as tmpdir:
        tmp = Path(tmpdir)
        with processes(tmp, (coord_cpus, other_cpus)) as env:
            coord = psutil.Process(env["coordinator"].pid)
            total = len(workloads) * len(SETUPS) * 2
            columns = (TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn())
            with Progress(*columns, console=console) as progress:
                task = progress.add_task("benchmark", total=total)
                for w in workloads:
                    for s in SETUPS:
                        model = f"{s.service}-{w.kind}"
                        body = {**w.body, "model": model}
                        direct_url = env["backends"][s.service] + w.path
                        gateway_url = env["url"] + w.path
                        check_answer(env["backends"][s.service], None, w, model)
                        check_answer(env["url"], env["key"], w, model)
                        script_d = lua_script(tmp / "direct.lua", body, None)
                        script_g = lua_script(tmp / "gateway.lua", body, env["key"])
                        progress.update(task, description=f"{w.name} {s.name} direct")
                        out = wrk(direct_url, script_d, s.connections, args.duration, other_cpus)
                        direct = parse_wrk(out, "direct")
                        progress.advance(task)
                        progress.update(task, description=f"{w.name} {s.name} gateway")
                        before = cpu_seconds(coord)
                        out = wrk(gateway_url, script_g, s.connections, args.duration, other_cpus)
                        used = cpu_seconds(coord) - before
                        gateway = parse_wrk(out, "gateway")
                        if gateway.requests:
                            gateway.cpu_ms_per_request = round(used * 1000 / gateway.requests, 3)
                        progress.advance(task)
                        results.append(Result(w.name, s.name, direct, gateway))
    report(results, args, coord_cpus)
    return 0


def report(results: list[Result], args: argparse.Namespace, coord_cpus: set[int]) -> None:
    table = Table(title="gateway vs direct (wrk)", header_style="bold")
    for col in ("workload", "setup", "direct rps", "gateway rps", "ratio", "direct p50")[:6]:
        table.add_column(col)
    for col in ("gateway p50", "added p50", "gw p99", "gw CPU/req", "errors"):
        table.add_column(col)
    rows = []
    for r in results:
        ratio = r.gateway.rps / r.direct.rps if r.direct.rps else 0.0
        added = r.gateway.p50_ms - r.direct.p50_ms
        r.extra = {"ratio": round(ratio, 3), "added_p50_ms": round(added, 3)}
        table.add_row(
            r.workload,
            r.setup,
            f"{r.direct.rps:.0f}",
            f"{r.gateway.rps:.0f}",
            f"{ratio:.2f}",
            f"{r.direct.p50_ms:.2f} ms",
            f"{r.gateway.p50_ms:.2f} ms",
            f"{added:+.2f} ms",
            f"{r.gateway.p99_ms:.2f} ms",
            f"{r.gateway.cpu_ms_per_request:.3f} ms" if r.gateway.cpu_ms_per_request else "-",
            str(r.direct.errors + r.gateway.errors),
        )
        rows.append(asdict(r))
    Console(width=200).print(table)
    doc = {
        "command": "python -m bench.run " + " ".join(sys.argv[1:]),
        "duration_s": args.duration,
        "machine": {
            "cpus": os.cpu_count(),
            "coordinator_pinned_to": sorted(coord_cpus),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpu": platform.processor() or platform.machine(),
        },
        "results": rows,
    }
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    console.print(f"results written to {args.out}")


if __name__ == "__main__":
    raise SystemExit(main())
