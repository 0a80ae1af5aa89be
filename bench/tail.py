"""The gateway's tail at c=32: p99 through the gateway against the backend called directly.

``python -m bench.tail`` starts the fake backend (``bench/fake_backend.py``, answering in 50 ms),
a real ``rma coordinator serve`` and one direct worker pointing at the backend (as
``bench/run.py`` does, without the tunnel worker), then runs ``wrk`` with 32 connections for the
same chat request, alternating between the two targets so that both see the same moment of a
shared machine: ``backend, gateway, backend, gateway, ...`` (``--rounds`` pairs, ``--duration``
seconds each).  Each run's p50/p90/p99, requests/s, errors, the load average and each CPU's
use are printed and written to ``--out`` (JSON), with the spread of the p99 over the rounds and
the p99 added by each gateway per round (its run minus the backend run just before it).
``--baseline-src DIR`` adds a coordinator from another checkout's ``src/`` as a third target.

``--sample OUT.txt`` runs the coordinator under ``bench/sampler.py`` (a stack sampler thread,
a loop-stall probe and GC pause timing) and leaves its report there; ``--sample OUT.prof`` runs
it under cProfile instead.

With two or more CPUs the coordinators are pinned to the first one and the backend and ``wrk``
to the others (``--no-pin``: not at all).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

from bench.run import (
    BACKEND,
    CHAT,
    ROOT,
    Workload,
    _cpu_model,
    _ms,
    check_answer,
    console,
    free_port,
    lua_script,
    pin,
    setup_pool,
    split_cpus,
    wait_http,
)

SAMPLER = ROOT / "bench" / "sampler.py"
CATALOG = """
[services.slow]
description = "fake backend answering in 50 ms"
tier = 3
kind = "openai"
models = ["slow-chat"]
"""
BODY = {**CHAT, "max_tokens": 16, "model": "slow-chat"}
PATH = "/v1/chat/completions"


def parse(out: str) -> dict[str, Any]:
    run: dict[str, Any] = {}
    if m := re.search(r"(\d+) requests in", out):
        run["requests"] = int(m.group(1))
    if m := re.search(r"Requests/sec:\s+([\d.]+)", out):
        run["rps"] = float(m.group(1))
    for q in ("50", "75", "90", "99"):
        if m := re.search(rf"^\s*{q}%\s+(\S+)\s*$", out, re.M):
            run[f"p{q}_ms"] = round(_ms(m.group(1)), 2)
    if m := re.search(r"Latency\s+(\S+)\s+(\S+)\s+(\S+)", out):
        run["max_ms"] = round(_ms(m.group(3)), 2)
    errors = 0
    if m := re.search(r"Non-2xx or 3xx responses: (\d+)", out):
        errors += int(m.group(1))
    if m := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out):
        errors += sum(int(g) for g in m.groups())
    run["errors"] = errors
    if "p99_ms" not in run or "requests" not in run:
        console.print(f"[yellow]could not read wrk's output:[/yellow]\n{out}")
    return run


def wrk(url: str, script: Path, connections: int, duration: float, cpus: set[int]) -> str:
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{duration:g}s", "--latency", "-s", str(script)]
    proc = subprocess.Popen([*cmd, url], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    pin(proc.pid, cpus)
    out, _ = proc.communicate(timeout=duration + 60)
    return out.decode()


def start_gateway(
    data: Path,
    catalog: Path,
    backend: str,
    src: Path | None,
    sample: Path | None,
    procs: list[subprocess.Popen[bytes]],
    cpus: set[int],
) -> tuple[str, str, str]:
    """A coordinator (from ``src``, another checkout's ``src/``, when given) with one direct
    worker serving ``backend``; its URL, admin key and an API key."""
    port = free_port()
    env = {**os.environ, "RMA_WORKER_CAPACITY": "1024", "RMA_OFFLINE_AFTER": "3600"}
    env["RMA_REMOVE_AFTER"] = "7200"
    if src is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(src), str(ROOT)])
    head = [sys.executable]
    if sample and sample.suffix == ".prof":
        head += ["-m", "cProfile", "-o", str(sample.resolve())]
    elif sample:
        head += [str(SAMPLER), str(sample.resolve()), "--"]
    data.mkdir(parents=True)
    log = open(data / "coordinator.log", "wb")  # noqa: SIM115
    coord = subprocess.Popen(
        [
            *head,
            *("-m", "rma", "coordinator", "serve", "--port", str(port)),
            *("--data-dir", str(data / "data"), "--catalog", str(catalog)),
            *("--log-level", "warning"),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    procs.append(coord)
    pin(coord.pid, cpus)
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/healthz", coord, "the coordinator", timeout=60)
    admin_key = (data / "data" / "admin.key").read_text().strip()
    api_key, _ = setup_pool(url, admin_key, {"slow": backend})
    check_answer(url, api_key, Workload("chat", PATH, BODY, "chat"), "slow-chat")
    return url, admin_key, api_key


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Gateway vs backend p99 at c=32, interleaved.")
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per wrk run")
    ap.add_argument("--rounds", type=int, default=3, help="backend+gateway pairs")
    ap.add_argument("--connections", type=int, default=32, help="wrk connections")
    ap.add_argument("--delay", type=float, default=0.05, help="the backend's answer delay (s)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "tail-results.json")
    ap.add_argument(
        "--sample",
        type=Path,
        help="run the coordinator under bench/sampler.py (OUT.txt) or cProfile (OUT.prof)",
    )
    ap.add_argument(
        "--baseline-src",
        type=Path,
        help="also run a coordinator from another checkout's src/ (a third target, interleaved)",
    )
    ap.add_argument("--no-pin", action="store_true", help="leave every process on every CPU")
    ap.add_argument("--label", default="", help="a note stored with the results")
    args = ap.parse_args(argv)
    if shutil.which("wrk") is None:
        console.print("[red]error:[/red] wrk is not installed (apt-get install wrk)")
        return 1
    coord_cpus, other_cpus = (set(), set()) if args.no_pin else split_cpus()
    procs: list[subprocess.Popen[bytes]] = []
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="rma-tail-") as tmpdir:
        tmp = Path(tmpdir)
        try:
            bport = free_port()
            cmd = [sys.executable, str(BACKEND), "--port", str(bport), "--name", "slow"]
            backend = subprocess.Popen([*cmd, "--delay", str(args.delay)])
            procs.append(backend)
            pin(backend.pid, other_cpus)
            burl = f"http://127.0.0.1:{bport}"
            wait_http(burl + "/health", backend, "the backend")
            catalog = tmp / "catalog.toml"
            catalog.write_text(CATALOG)
            gateways: dict[str, Path | None] = {"gateway": None}
            if args.baseline_src:
                gateways["baseline"] = args.baseline_src.resolve()
            scripts = {"backend": (burl, lua_script(tmp / "backend.lua", BODY, None))}
            admins = {}
            for target, src in gateways.items():
                url, admin_key, api_key = start_gateway(
                    tmp / target, catalog, burl, src, args.sample if target == "gateway" else None,
                    procs, coord_cpus,
                )  # fmt: skip
                admins[target] = (url, admin_key)
                scripts[target] = (url, lua_script(tmp / f"{target}.lua", BODY, api_key))
            # a short warm-up of each (connections, caches), not recorded
            warm: dict[str, int] = {}
            for target, (base, script) in scripts.items():
                out = wrk(base + PATH, script, args.connections, 2, other_cpus)
                warm[target] = parse(out).get("requests", 0)
            for i in range(args.rounds):
                for target, (base, script) in scripts.items():
                    load = os.getloadavg()
                    psutil.cpu_percent(percpu=True)  # from here
                    out = wrk(base + PATH, script, args.connections, args.duration, other_cpus)
                    busy = psutil.cpu_percent(percpu=True)  # each CPU's use during the run
                    run = {"round": i + 1, "target": target, **parse(out)}
                    run["load_1m"] = round(load[0], 2)
                    run["cpu_busy_percent"] = busy
                    runs.append(run)
                    console.print(run)
            written = {t: _usage_rows(*admins[t]) for t in gateways}
        finally:
            for p in reversed(procs):
                if p.poll() is None:
                    # SIGINT under cProfile: it writes its file only on a normal exit
                    is_prof = args.sample is not None and args.sample.suffix == ".prof"
                    p.send_signal(signal.SIGINT if is_prof else signal.SIGTERM)
                    try:
                        p.wait(15)
                    except subprocess.TimeoutExpired:
                        p.kill()
                        p.wait()
    doc = _summary(args, runs, coord_cpus, written, warm)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    console.print_json(json.dumps(doc["summary"]))
    console.print(f"results written to {args.out}")
    return 0


def _usage_rows(url: str, admin_key: str) -> int:
    """Requests the usage table holds (``rma admin stats``): every gateway request is one."""
    r = httpx.get(
        url + "/api/admin/stats", headers={"authorization": f"Bearer {admin_key}"}, timeout=30
    )
    r.raise_for_status()
    return sum(int(s["requests"]) for s in r.json()["usage"]["by_service"])


def _summary(
    args: argparse.Namespace,
    runs: list[dict[str, Any]],
    coord_cpus: set[int],
    written: dict[str, int],
    warm: dict[str, int],
) -> dict[str, Any]:
    targets = list(dict.fromkeys(r["target"] for r in runs))
    summary: dict[str, Any] = {}
    for target in targets:
        values = [r["p99_ms"] for r in runs if r["target"] == target and "p99_ms" in r]
        if values:
            summary[f"{target}_p99_ms"] = {
                "min": min(values),
                "median": statistics.median(values),
                "max": max(values),
            }
    for target in targets[1:]:
        added = []
        for i in range(1, args.rounds + 1):
            pair = {r["target"]: r for r in runs if r["round"] == i}
            if "p99_ms" in pair.get("backend", {}) and "p99_ms" in pair.get(target, {}):
                added.append(round(pair[target]["p99_ms"] - pair["backend"]["p99_ms"], 2))
        summary[f"{target}_added_p99_ms_per_round"] = added
        # wrk counts the answers it read; a request cut off when a run ends is a 499 row more
        done = sum(r.get("requests", 0) for r in runs if r["target"] == target)
        summary[f"{target}_answers_read_by_wrk"] = done + warm.get(target, 0)
        summary[f"{target}_usage_rows"] = written.get(target)
    return {
        "command": "python -m bench.tail " + " ".join(sys.argv[1:]),
        "label": args.label,
        "duration_s": args.duration,
        "connections": args.connections,
        "backend_delay_s": args.delay,
        "machine": {
            "cpus": os.cpu_count(),
            "coordinator_pinned_to": sorted(coord_cpus),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpu": _cpu_model(),
            "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        },
        "runs": runs,
        "summary": summary,
    }


if __name__ == "__main__":
    raise SystemExit(main())
