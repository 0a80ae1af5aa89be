"""How unbalanced per-worker in-flight gets when several coordinators each count only their own:
``python -m bench.ha_inflight --database-url postgresql+psycopg://... [--clients 12]
[--seconds 20] [--coordinators 1,3]``.

For each number of coordinators it starts them on the given PostgreSQL database (emptied first:
give it a database of its own), a real HAProxy in front (``containers/haproxy.cfg`` on loopback),
``--workers`` real agents (``--transport direct``, the fake OpenAI backend answering after
``--delay`` seconds, so requests overlap), and ``--clients`` threads of non-streamed chat
completions (the ``openai`` SDK) through the balancer for ``--seconds``.  Every answer names its
worker (``x-rma-worker``); from each request's start and end the client side knows how many were
in flight on each worker at every instant (sampled every 10 ms).

Each coordinator picks the least loaded worker by its own in-flight counts (and the load the
worker last reported to it in a heartbeat), so with N coordinators a worker can hold up to N
requests another coordinator does not know of.  Figures: per worker, the share of the answers;
over the samples, the mean and p99 of the busiest worker's in-flight count, and the mean spread
(busiest minus idlest); the ideal is clients / workers on each.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(what: str, check: Any, timeout: float, procs: list[subprocess.Popen[bytes]]) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in procs:
            if p.poll() is not None:
                raise SystemExit(f"{p.args!r} exited with {p.returncode} while waiting for {what}")
        with contextlib.suppress(httpx.HTTPError):
            found = check()
            if found:
                return found
        time.sleep(0.2)
    raise SystemExit(f"timed out waiting for {what}")


def empty_database(url: str) -> None:
    import psycopg

    with psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://")) as conn:
        conn.execute("DROP SCHEMA public CASCADE")
        conn.execute("CREATE SCHEMA public")


def catalog_text(delay: float, workers: int) -> str:
    from rma.catalog import load_catalog

    fake = f"""[services.fake]
description = "fake OpenAI backend, {delay} s per answer"
tier = 3
kind = "openai"
models = ["fake-model"]
command = ["{{python}}", "{ROOT / "bench" / "fake_backend.py"}", "--port", "{{port}}",
           "--delay", "{delay}"]
health = "/health"
replicas = {workers}
"""
    never = [f'[services.{n}]\nlabels = {{ rma_never = "1" }}\n' for n in load_catalog()]
    return fake + "\n" + "\n".join(never)


def haproxy_config(port: int, servers: dict[str, str]) -> str:
    cfg = (ROOT / "containers" / "haproxy.cfg").read_text()
    cfg = "\n".join(line for line in cfg.splitlines() if not line.strip().startswith("server "))
    cfg = cfg.replace("bind *:8420", f"bind 127.0.0.1:{port}")
    cfg = re.sub(r"maxconn \d+", "maxconn 1000", cfg)
    for name, url in servers.items():
        cfg += f"\n    server {name} {url.removeprefix('http://')} check"
    return cfg + "\n"


@contextlib.contextmanager
def topology(tmp: Path, args: argparse.Namespace, coordinators: int) -> Iterator[tuple[str, str]]:
    """The balancer's URL and an API key, everything healthy; all stopped after."""
    from rma.coordinator.credentials import write_secret_file

    empty_database(args.database_url)
    catalog = tmp / "catalog.toml"
    catalog.write_text(catalog_text(args.delay, args.workers))
    env = {**os.environ, "RMA_HEARTBEAT_INTERVAL": "1", "RMA_DEFAULT_RPM": "0"}
    procs: list[subprocess.Popen[bytes]] = []
    try:
        urls: dict[str, str] = {}
        admin_key = ""
        for i in range(coordinators):
            name = f"coord-{i + 1}"
            port = free_port()
            data = tmp / name
            data.mkdir(parents=True, exist_ok=True)
            if admin_key:  # the others find the first's admin key in the database
                write_secret_file(data / "admin.key", admin_key)
            cmd = [sys.executable, "-m", "rma", "coordinator", "serve", "--port", str(port)]
            cmd += ["--data-dir", str(data), "--log-level", "warning", "--catalog", str(catalog)]
            cmd += ["--database-url", args.database_url]
            with open(tmp / f"{name}.log", "ab") as log:
                procs.append(
                    subprocess.Popen(
                        cmd,
                        env={**env, "RMA_COORDINATOR_NAME": name},
                        stdout=log,
                        stderr=subprocess.STDOUT,
                    )
                )
            url = f"http://127.0.0.1:{port}"
            wait_for(name, lambda u=url: httpx.get(u + "/healthz").status_code == 200, 60, procs)
            admin_key = admin_key or (data / "admin.key").read_text().strip()
            urls[name] = url
        lb_port = free_port()
        (tmp / "haproxy.cfg").write_text(haproxy_config(lb_port, urls))
        haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
        with open(tmp / "haproxy.log", "ab") as log:
            procs.append(
                subprocess.Popen(
                    [haproxy, "-db", "-f", str(tmp / "haproxy.cfg")],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
        lb = f"http://127.0.0.1:{lb_port}"
        wait_for("HAProxy", lambda: httpx.get(lb + "/readyz").status_code == 200, 30, procs)
        admin = httpx.Client(
            base_url=lb, headers={"authorization": f"Bearer {admin_key}"}, timeout=30
        )
        with admin:
            body = {"ttl": 600, "uses": args.workers, "label": "bench"}
            token = admin.post("/api/admin/tokens", json=body).raise_for_status().json()["token"]
            key = admin.post("/api/admin/keys", json={"name": "bench", "rpm": 0}).json()["key"]
            for i in range(args.workers):
                name = f"w{i + 1}"
                join = ["--coordinator", lb, "--token", token, "--name", name]
                join += ["--runtime", "process", "--transport", "direct", "--catalog", str(catalog)]
                join += ["--data-dir", str(tmp / name)]
                with open(tmp / f"{name}.log", "ab") as log:
                    procs.append(
                        subprocess.Popen(
                            [sys.executable, "-m", "rma", "worker", "join", *join],
                            env=env,
                            stdout=log,
                            stderr=subprocess.STDOUT,
                        )
                    )

            def healthy() -> bool:
                rows = admin.get("/api/admin/workers").json()
                return (
                    sum(
                        1
                        for w in rows
                        if any(s["name"] == "fake" and s["healthy"] for s in w["services"])
                    )
                    == args.workers
                )

            wait_for(f"{args.workers} healthy workers", healthy, 300, procs)
        yield lb, key
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in reversed(procs):
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)


def load(lb: str, key: str, clients: int, seconds: float) -> list[tuple[float, float, str]]:
    import openai

    done: list[tuple[float, float, str]] = []
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def run() -> None:
        with openai.OpenAI(base_url=lb + "/v1", api_key=key, max_retries=0, timeout=30) as c:
            n = 0
            while time.monotonic() < stop:
                n += 1  # a new conversation each time: cache affinity has nothing to keep
                start = time.monotonic()
                message = {"role": "user", "content": f"hello {threading.get_ident()} {n}"}
                raw = c.chat.completions.with_raw_response.create(
                    model="fake-model", messages=[message]
                )
                worker = raw.headers.get("x-rma-worker", "?")
                raw.parse()
                with lock:
                    done.append((start, time.monotonic(), worker))

    threads = [threading.Thread(target=run) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return done


def figures(
    done: list[tuple[float, float, str]], clients: int, workers: list[str]
) -> dict[str, Any]:
    t0 = min(s for s, _, _ in done) + 2  # past the ramp-up and before the ramp-down
    t1 = max(e for _, e, _ in done) - 2
    busiest: list[int] = []
    spread: list[int] = []
    t = t0
    while t < t1:
        counts = dict.fromkeys(workers, 0)
        for s, e, w in done:
            if s <= t < e and w in counts:
                counts[w] += 1
        busiest.append(max(counts.values()))
        spread.append(max(counts.values()) - min(counts.values()))
        t += 0.01
    busiest.sort()
    latency = sorted(e - s for s, e, _ in done)
    return {
        "answers": len(done),
        "share": {w: round(sum(1 for *_, x in done if x == w) / len(done), 3) for w in workers},
        "ideal_inflight": round(clients / len(workers), 2),
        "busiest_mean": round(statistics.fmean(busiest), 2),
        "busiest_p99": busiest[int(len(busiest) * 0.99)],
        "spread_mean": round(statistics.fmean(spread), 2),
        "latency_p50_ms": round(latency[len(latency) // 2] * 1000, 1),
        "latency_p99_ms": round(latency[int(len(latency) * 0.99)] * 1000, 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--database-url", default=os.environ.get("RMA_TEST_DATABASE_URL"))
    p.add_argument("--coordinators", default="1,3", help="comma-separated counts to compare")
    p.add_argument("--workers", type=int, default=3)
    p.add_argument("--clients", type=int, default=12)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--delay", type=float, default=0.2, help="the backend's seconds per answer")
    args = p.parse_args()
    if not args.database_url or not args.database_url.startswith("postgresql"):
        raise SystemExit("error: --database-url postgresql+psycopg://... (a database of its own)")
    results = []
    for n in (int(x) for x in args.coordinators.split(",")):
        with tempfile.TemporaryDirectory(prefix="rma-ha-inflight-") as tmp:
            with topology(Path(tmp), args, n) as (lb, key):
                done = load(lb, key, args.clients, args.seconds)
            row = {"coordinators": n, "workers": args.workers, "clients": args.clients}
            row |= figures(done, args.clients, [f"w{i + 1}" for i in range(args.workers)])
            print(json.dumps(row), flush=True)
            results.append(row)


if __name__ == "__main__":
    main()
