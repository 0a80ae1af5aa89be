"""The gateway benchmark: the coordinator's cost, direct and through a tunnel, against the backend.

``python -m bench.run`` (or ``nox -s bench``) starts, on this machine, a fast fake OpenAI backend
(``bench/fake_backend.py``), a real coordinator (``rma coordinator serve``), one direct worker
pointing at the backend, and one tunnel worker (``bench/tunnel_worker.py``: the agent's real
``TunnelClient`` process) serving the same backend under other service names.  It then runs
``wrk`` (Lua scripts for the POST bodies) against three targets, one after the other in the same
run, for chat, streamed chat and embeddings:

- ``backend``: the fake backend itself, no gateway;
- ``direct``: through the gateway to the direct worker (plain HTTP/1.1);
- ``tunnel``: through the gateway and the worker's WebSocket tunnel.

Three setups per workload:

- backend answering in 50 ms, 32 connections: gateway throughput / backend throughput (goal >= 0.9)
- backend answering in 50 ms, 1 connection: p50 added by the gateway (goal <= 2 ms)
- backend answering at once, 32 connections: requests/s and CPU time per request of the
  coordinator (and of the tunnel worker), read with psutil before and after each run (goal: the
  coordinator <= 1 ms)

With two or more CPUs, the coordinator is pinned to the first one and the backend, the tunnel
worker and ``wrk`` to the others.  Results go to stdout (a table) and to ``--out`` (JSON).
``--profile DIR`` runs the coordinator and the tunnel worker under cProfile (slower) and leaves
``coordinator.prof`` and ``tunnel-worker.prof`` in DIR.
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
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
BACKEND = ROOT / "bench" / "fake_backend.py"
TUNNEL_WORKER = ROOT / "bench" / "tunnel_worker.py"
console = Console(stderr=True)

#: The direct worker serves ``slow``/``fast``; the tunnel worker the same backends as
#: ``slow-tunnel``/``fast-tunnel`` (other model names, so the gateway routes each to its worker).
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
[services.slow-tunnel]
description = "the 50 ms backend, through a tunnel worker"
tier = 3
kind = "openai"
models = ["slow-tunnel-chat", "slow-tunnel-embed"]
[services.fast-tunnel]
description = "the instant backend, through a tunnel worker"
tier = 3
kind = "openai"
models = ["fast-tunnel-chat", "fast-tunnel-embed"]
"""

CHAT = {"messages": [{"role": "user", "content": "Say hello in one short sentence."}]}
EMBED = {"input": ["The quick brown fox jumps over the lazy dog."]}
TARGETS = ("backend", "direct", "tunnel")


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
    Setup("50ms-c32", "slow", 32, "throughput >= 0.9 x backend"),
    Setup("50ms-c1", "slow", 1, "p50 added <= 2 ms"),
    Setup("instant-c32", "fast", 32, "coordinator CPU per request <= 1 ms"),
)


@dataclass
class Run:
    target: str  # "backend", "direct" (gateway, direct worker) or "tunnel" (gateway, tunnel)
    requests: int = 0
    rps: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    errors: int = 0
    #: CPU time of the coordinator process per request served (gateway targets).
    cpu_ms_per_request: float | None = None
    #: CPU time of the tunnel worker process per request (the tunnel target).
    worker_cpu_ms_per_request: float | None = None


@dataclass
class Result:
    workload: str
    setup: str
    runs: dict[str, Run]
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


def python(profile: Path | None, name: str) -> list[str]:
    """``python``, or ``python -m cProfile -o DIR/name.prof`` when profiling."""
    if profile is None:
        return [sys.executable]
    return [sys.executable, "-m", "cProfile", "-o", str(profile / f"{name}.prof")]


@contextmanager
def processes(
    tmp: Path, cpus: tuple[set[int], set[int]], profile: Path | None = None
) -> Iterator[dict[str, Any]]:
    coord_cpus, other_cpus = cpus
    procs: list[subprocess.Popen[bytes]] = []
    try:
        backends = {}
        for service, delay in (("slow", "0.05"), ("fast", "0")):
            port = free_port()
            cmd = [sys.executable, str(BACKEND), "--port", str(port), "--name", service]
            p = subprocess.Popen([*cmd, "--delay", delay], stdout=subprocess.DEVNULL)
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
                *python(profile, "coordinator"),
                *("-m", "rma", "coordinator", "serve", "--port", str(port)),
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
        wait_http(url + "/healthz", coord, "the coordinator", timeout=60)
        admin_key = (tmp / "data" / "admin.key").read_text().strip()
        api_key, token = setup_pool(url, admin_key, backends)
        services = {f"{name}-tunnel": endpoint for name, endpoint in backends.items()}
        worker = start_tunnel_worker(url, token, services, profile)
        procs.append(worker)
        pin(worker.pid, other_cpus)
        yield {
            "url": url,
            "key": api_key,
            "backends": backends,
            "coordinator": coord,
            "worker": worker,
        }
    finally:
        # the tunnel worker first: it leaves before its coordinator; SIGINT lets cProfile write
        stop = signal.SIGINT if profile else signal.SIGTERM
        for p in reversed(procs):
            if p.poll() is None:
                p.send_signal(stop)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(10)
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def start_tunnel_worker(
    url: str, token: str, services: dict[str, str], profile: Path | None
) -> subprocess.Popen[bytes]:
    cmd = [*python(profile, "tunnel-worker"), str(TUNNEL_WORKER), "--coordinator", url]
    cmd += ["--token", token, "--heartbeat", "2"]
    if os.environ.get("RMA_BENCH_WORKER_UVLOOP"):
        cmd.append("--uvloop")
    for name, endpoint in services.items():
        cmd += ["--service", f"{name}={endpoint}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    proc.stdout.close()
    if not line:
        raise SystemExit(f"the tunnel worker exited with {proc.wait(5)}")
    return proc


def setup_pool(url: str, admin_key: str, backends: dict[str, str]) -> tuple[str, str]:
    """An API key, the direct worker registered and healthy, a join token for the tunnel one."""
    admin = {"authorization": f"Bearer {admin_key}"}
    with httpx.Client(base_url=url, headers=admin, timeout=10) as c:
        key = c.post("/api/admin/keys", json={"name": "bench", "rpm": 0}).json()["key"]
        tokens = [
            c.post("/api/admin/tokens", json={"ttl": 600, "uses": 1}).json()["token"]
            for _ in range(2)
        ]
    caps = {"cpu_cores": 2, "memory_mb": 4096, "os": "linux", "arch": "x86_64"}
    reg = httpx.post(
        url + "/api/worker/register",
        json={
            "token": tokens[0],
            "name": "bench-direct",
            "capabilities": caps,
            "transport": "direct",
            "runnable": list(backends),
        },
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
    return str(key), str(tokens[1])


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
    if m := re.search(r"^\s*50%\s+(\S+)\s*$", out, re.M):
        run.p50_ms = _ms(m.group(1))
    if m := re.search(r"^\s*99%\s+(\S+)\s*$", out, re.M):
        run.p99_ms = _ms(m.group(1))
    if run.p50_ms != run.p50_ms or run.p99_ms != run.p99_ms or not run.requests:  # NaN
        console.print(f"[yellow]could not read wrk's output for {target}:[/yellow]\n{out}")
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
    deadline = time.monotonic() + 15  # the tunnel worker's first heartbeat may still be coming
    while True:
        r = httpx.post(url + w.path, json={**w.body, "model": model}, headers=headers, timeout=10)
        if r.status_code == 200 and (b"[DONE]" in r.content or b'"usage"' in r.content):
            return
        if time.monotonic() > deadline:
            raise SystemExit(f"{url}{w.path} ({model}) answered {r.status_code}: {r.text[:300]}")
        time.sleep(0.2)


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
    ap = argparse.ArgumentParser(description="Backend vs gateway (direct, tunnel) benchmark.")
    ap.add_argument("--duration", type=float, default=5.0, help="seconds per wrk run")
    ap.add_argument("--quick", action="store_true", help="2 s per wrk run")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results.json")
    ap.add_argument("--only", default="", help="comma-separated workloads (chat,stream,embeddings)")
    ap.add_argument("--setups", default="", help="comma-separated setups (50ms-c32,50ms-c1,...)")
    ap.add_argument("--targets", default=",".join(TARGETS), help="comma-separated targets")
    ap.add_argument("--profile", type=Path, help="cProfile the coordinator and tunnel worker")
    args = ap.parse_args(argv)
    if args.quick:
        args.duration = 2.0
    if shutil.which("wrk") is None:
        console.print("[red]error:[/red] wrk is not installed (apt-get install wrk)")
        return 1
    workloads = [w for w in WORKLOADS if not args.only or w.name in args.only.split(",")]
    setups = [s for s in SETUPS if not args.setups or s.name in args.setups.split(",")]
    targets = [t for t in TARGETS if t in args.targets.split(",")]
    if not workloads or not setups or not targets:
        console.print("[red]error:[/red] nothing to run (check --only, --setups, --targets)")
        return 1
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
    coord_cpus, other_cpus = split_cpus()
    load = os.getloadavg()
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="rma-bench-") as tmpdir:
        tmp = Path(tmpdir)
        with processes(tmp, (coord_cpus, other_cpus), args.profile) as env:
            total = len(workloads) * len(setups) * len(targets)
            columns = (
                TextColumn("{task.description:<32}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
            )
            with Progress(*columns, console=console) as progress:
                task = progress.add_task("benchmark", total=total)
                for w in workloads:
                    for s in setups:
                        runs = {}
                        for target in targets:
                            progress.update(task, description=f"{w.name} {s.name} {target}")
                            runs[target] = one_run(env, tmp, w, s, target, args.duration)
                            progress.advance(task)
                        results.append(Result(w.name, s.name, runs))
    report(results, args, coord_cpus, load)
    return 0


def one_run(
    env: dict[str, Any], tmp: Path, w: Workload, s: Setup, target: str, duration: float
) -> Run:
    """One wrk run against ``target``, with the coordinator's and the worker's CPU time."""
    service = s.service + ("-tunnel" if target == "tunnel" else "")
    model = f"{service}-{w.kind}"
    body = {**w.body, "model": model}
    if target == "backend":
        base, key = env["backends"][s.service], None
    else:
        base, key = env["url"], env["key"]
    check_answer(base, key, w, model)
    script = lua_script(tmp / f"{target}.lua", body, key)
    coord = psutil.Process(env["coordinator"].pid)
    worker = psutil.Process(env["worker"].pid)
    c0, w0 = cpu_seconds(coord), cpu_seconds(worker)
    run = parse_wrk(wrk(base + w.path, script, s.connections, duration, split_cpus()[1]), target)
    c1, w1 = cpu_seconds(coord), cpu_seconds(worker)
    if run.requests and target != "backend":
        run.cpu_ms_per_request = round((c1 - c0) * 1000 / run.requests, 3)
    if run.requests and target == "tunnel":
        run.worker_cpu_ms_per_request = round((w1 - w0) * 1000 / run.requests, 3)
    return run


def report(
    results: list[Result],
    args: argparse.Namespace,
    coord_cpus: set[int],
    load: tuple[float, float, float],
) -> None:
    table = Table(
        title="backend vs gateway: direct worker, tunnel worker (wrk)", header_style="bold"
    )
    columns = ["workload", "setup", "backend rps", "direct rps", "tunnel rps", "backend p50"]
    columns += ["direct +p50", "tunnel +p50", "direct p99", "tunnel p99"]
    columns += ["coord CPU/req direct", "coord CPU/req tunnel", "worker CPU/req", "errors"]
    for col in columns:
        table.add_column(col, justify="left" if col in ("workload", "setup") else "right")
    rows = []
    for r in results:
        base = r.runs.get("backend")
        cells = [r.workload, r.setup, _rps(base)]
        for target in ("direct", "tunnel"):
            run = r.runs.get(target)
            if run is None:
                cells.append("-")
                continue
            ratio = run.rps / base.rps if base and base.rps else None
            if ratio is not None:
                r.extra[f"{target}_ratio"] = round(ratio, 3)
                r.extra[f"{target}_added_p50_ms"] = round(run.p50_ms - base.p50_ms, 3)
            cells.append(_rps(run) + (f" ({ratio:.2f})" if ratio is not None else ""))
        cells.append(f"{base.p50_ms:.2f} ms" if base else "-")
        for target in ("direct", "tunnel"):
            key = f"{target}_added_p50_ms"
            cells.append(f"{r.extra[key]:+.2f} ms" if key in r.extra else "-")
        for target in ("direct", "tunnel"):
            run = r.runs.get(target)
            cells.append(f"{run.p99_ms:.2f} ms" if run else "-")
        for target in ("direct", "tunnel"):
            run = r.runs.get(target)
            cpu = run.cpu_ms_per_request if run else None
            cells.append(f"{cpu:.3f} ms" if cpu is not None else "-")
        tunnel = r.runs.get("tunnel")
        wcpu = tunnel.worker_cpu_ms_per_request if tunnel else None
        cells.append(f"{wcpu:.3f} ms" if wcpu is not None else "-")
        cells.append(str(sum(run.errors for run in r.runs.values())))
        table.add_row(*cells)
        rows.append(asdict(r))
    Console(width=240).print(table)
    doc = {
        "command": "python -m bench.run " + " ".join(sys.argv[1:]),
        "duration_s": args.duration,
        "machine": {
            "cpus": os.cpu_count(),
            "coordinator_pinned_to": sorted(coord_cpus),
            "load_average_at_start": [round(x, 2) for x in load],
            "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpu": _cpu_model(),
        },
        "results": rows,
    }
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    console.print(f"results written to {args.out}")


def _rps(run: Run | None) -> str:
    return f"{run.rps:.0f}" if run else "-"


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


if __name__ == "__main__":
    raise SystemExit(main())
