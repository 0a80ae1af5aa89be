"""Tunnel vs direct vs the backend itself: throughput and added p50 (a quick, httpx-driven run).

``python tests/tunnel/bench_tunnel.py [--requests 400] [--concurrency 32] [--delay 0]``

Real processes: a fake OpenAI backend (``bench/fake_backend.py``), a coordinator, one direct
worker (registered over HTTP, like ``bench/run.py`` does) and one tunnel worker
(``tunnel_worker.py``: the real ``TunnelClient``), both pointing at the same backend under two
catalog services.  The numbers include the httpx client's own cost; ``bench/run.py`` (wrk) is
the reference benchmark, this is the tunnel row's recipe.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))
import tunnel_worker  # noqa: E402

CATALOG = """
[services.fake]
tier = 3
kind = "openai"
models = ["direct-model"]
[services.faket]
tier = 3
kind = "openai"
models = ["tunnel-model"]
"""
CAPS = {"cpu_cores": 2, "memory_mb": 4096, "os": "linux", "arch": "x86_64"}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait(url: str) -> None:
    for _ in range(300):
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up")


async def measure(
    url: str, body: dict[str, Any], headers: dict[str, str], n: int, c: int
) -> dict[str, float]:
    limits = httpx.Limits(max_connections=c, max_keepalive_connections=c)
    async with httpx.AsyncClient(limits=limits, timeout=30, headers=headers) as client:
        for _ in range(20):  # warm up
            (await client.post(url, json=body)).raise_for_status()
        lat = []
        for _ in range(n):
            t = time.perf_counter()
            (await client.post(url, json=body)).raise_for_status()
            lat.append(time.perf_counter() - t)
        queue = list(range(n * 2))

        async def loop() -> None:
            while queue:
                queue.pop()
                (await client.post(url, json=body)).raise_for_status()

        t = time.perf_counter()
        await asyncio.gather(*(loop() for _ in range(c)))
        rps = n * 2 / (time.perf_counter() - t)
    return {"p50_ms": statistics.median(lat) * 1000, "rps": rps}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--delay", default="0")
    args = ap.parse_args()
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        try:
            bport, cport = free_port(), free_port()
            backend_cmd = [sys.executable, str(ROOT / "bench" / "fake_backend.py")]
            backend_cmd += ["--port", str(bport), "--delay", args.delay]
            procs.append(subprocess.Popen(backend_cmd, stdout=subprocess.DEVNULL))
            backend = f"http://127.0.0.1:{bport}"
            wait(backend + "/health")
            (tmp / "catalog.toml").write_text(CATALOG)
            env = {**os.environ, "RMA_WORKER_CAPACITY": "1024", "RMA_DATA_DIR": str(tmp / "d")}
            coord_cmd = [sys.executable, "-m", "rma", "coordinator", "serve", "--port", str(cport)]
            coord_cmd += ["--catalog", str(tmp / "catalog.toml"), "--log-level", "warning"]
            procs.append(subprocess.Popen(coord_cmd, env=env, stderr=subprocess.DEVNULL))
            url = f"http://127.0.0.1:{cport}"
            wait(url + "/healthz")
            admin = {"authorization": f"Bearer {(tmp / 'd' / 'admin.key').read_text().strip()}"}
            with httpx.Client(base_url=url, headers=admin, timeout=10) as c:
                key = c.post("/api/admin/keys", json={"name": "b", "rpm": 0}).json()["key"]
                tokens = [
                    c.post("/api/admin/tokens", json={"ttl": 600, "uses": 1}).json()["token"]
                    for _ in range(2)
                ]
            reg = httpx.post(
                url + "/api/worker/register",
                json={
                    "token": tokens[0],
                    "name": "direct",
                    "capabilities": CAPS,
                    "transport": "direct",
                    "runnable": ["fake"],
                },
            ).json()
            svc = [{"name": "fake", "state": "running", "healthy": True, "endpoint": backend}]
            httpx.post(
                url + "/api/worker/heartbeat",
                json={"services": svc},
                headers={"authorization": f"Bearer {reg['credential']}"},
            ).raise_for_status()
            proc, _ = tunnel_worker.start(url, tokens[1], {"faket": backend}, "tunnel")
            procs.append(proc)
            time.sleep(1.5)  # first heartbeat
            chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 16}
            auth = {"authorization": f"Bearer {key}"}
            rows = {
                "backend": asyncio.run(
                    measure(
                        backend + "/v1/chat/completions",
                        {**chat, "model": "direct-model"},
                        {},
                        args.requests,
                        args.concurrency,
                    )
                ),
                "direct": asyncio.run(
                    measure(
                        url + "/v1/chat/completions",
                        {**chat, "model": "direct-model"},
                        auth,
                        args.requests,
                        args.concurrency,
                    )
                ),
                "tunnel": asyncio.run(
                    measure(
                        url + "/v1/chat/completions",
                        {**chat, "model": "tunnel-model"},
                        auth,
                        args.requests,
                        args.concurrency,
                    )
                ),
            }
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                p.wait(10)
    base = rows["backend"]["p50_ms"]
    for name, r in rows.items():
        r["added_p50_ms"] = r["p50_ms"] - base
    print(
        json.dumps({k: {m: round(v, 3) for m, v in r.items()} for k, r in rows.items()}, indent=2)
    )


if __name__ == "__main__":
    main()
