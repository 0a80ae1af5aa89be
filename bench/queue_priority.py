"""Giving back, measured: under saturation, a contributing owner's key waits less in the queue.

``python -m bench.queue_priority [--clients 8] [--requests 25] [--delay 0.05]`` starts a real
coordinator and one fake backend (``bench/fake_backend.py``, answering in ``--delay`` s) as the
only worker of a service with room for one request at a time; the worker belongs to owner
``alice`` (``owner`` at registration), who earns credits with a warm-up.  Then ``--clients``
loops with alice's key (``owner: alice``) and as many with an anonymous key (no owner) send
``--requests`` each, all at once, and it reports each key's p50 / p90 queue wait (latency minus
the fastest answer, i.e. the time spent waiting for the slot), mean and max.  With
``RMA_QUEUE_PRIORITY_AGING=100000`` in the environment the queue is first come first served
(the baseline).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench.verify_overhead import BACKEND, CAPS, _port, _wait_http

CATALOG = """
[services.emb]
description = "fake embeddings with room for one request at a time"
tier = 3
kind = "openai"
models = ["fake-embed"]
task = "embeddings"
capacity = 1
credit_weight = 10.0
"""


def run(clients: int, requests: int, delay: float) -> dict[str, Any]:
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory() as tmp:
        try:
            bport = _port()
            cmd = [sys.executable, str(BACKEND), "--port", str(bport), "--name", "donor"]
            cmd += ["--dim", "16", "--delay", str(delay)]
            procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL))
            backend = f"http://127.0.0.1:{bport}"
            _wait_http(backend + "/health", procs[-1])
            catalog = Path(tmp) / "catalog.toml"
            catalog.write_text(CATALOG)
            port = _port()
            cmd = [sys.executable, "-m", "rma", "coordinator", "serve", "--port", str(port)]
            cmd += ["--data-dir", f"{tmp}/data", "--catalog", str(catalog)]
            cmd += ["--log-level", "warning"]
            env = {**os.environ, "RMA_CREDIT_ESCROW_RESULTS": "0", "RMA_QUEUE_SIZE": "256"}
            procs.append(subprocess.Popen(cmd, env=env))
            url = f"http://127.0.0.1:{port}"
            _wait_http(url + "/healthz", procs[-1])
            return asyncio.run(_measure(url, Path(tmp) / "data", backend, clients, requests))
        finally:
            for p in procs:
                p.send_signal(signal.SIGTERM)
            for p in procs:
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def _measure(
    url: str, data: Path, backend: str, clients: int, requests: int
) -> dict[str, Any]:
    admin_key = (data / "admin.key").read_text().strip()
    async with httpx.AsyncClient(
        base_url=url, headers={"authorization": f"Bearer {admin_key}"}, timeout=30
    ) as admin:
        keys = {}
        for who, owner in (("alice", "alice"), ("anonymous", "")):
            body = {"name": who, "rpm": 0, "owner": owner}
            keys[who] = (await admin.post("/api/admin/keys", json=body)).json()["key"]
        token = (await admin.post("/api/admin/tokens", json={})).json()["token"]
        reg = {"token": token, "name": "donor", "capabilities": CAPS, "transport": "direct",
               "runnable": ["emb"], "owner": "alice"}  # fmt: skip
        r = await admin.post("/api/worker/register", json=reg)
        cred = r.json()["credential"]
        hb = {"services": [{"name": "emb", "state": "running", "healthy": True,
                            "endpoint": backend}]}  # fmt: skip
        r = await admin.post(
            "/api/worker/heartbeat", json=hb, headers={"authorization": f"Bearer {cred}"}
        )
        r.raise_for_status()

        body = {"model": "fake-embed", "input": "hello"}
        async with httpx.AsyncClient(base_url=url, timeout=60) as c:
            auth = {who: {"authorization": f"Bearer {k}"} for who, k in keys.items()}
            for _ in range(20):  # alice's worker earns credits
                (
                    await c.post("/v1/embeddings", json=body, headers=auth["alice"])
                ).raise_for_status()
            await asyncio.sleep(6.5)  # the owners' credits are read every 5 s
            credits = (await admin.get("/api/admin/credits", params={"by": "owner"})).json()
            latencies: dict[str, list[float]] = {"alice": [], "anonymous": []}
            failed = 0

            async def loop(who: str) -> None:
                nonlocal failed
                for _ in range(requests):
                    t0 = time.perf_counter()
                    r = await c.post("/v1/embeddings", json=body, headers=auth[who])
                    if r.status_code != 200:
                        failed += 1
                        continue
                    latencies[who].append(time.perf_counter() - t0)

            await asyncio.gather(*(loop(w) for w in ("alice", "anonymous") for _ in range(clients)))
    fastest = min(min(v) for v in latencies.values())
    out: dict[str, Any] = {
        "clients_per_key": clients,
        "requests_per_client": requests,
        "alice_credits": next((r["credits"] for r in credits if r["owner"] == "alice"), 0.0),
        "failed": failed,
    }
    for who, values in latencies.items():
        waits = [v - fastest for v in values]
        out[f"{who}_wait_p50_ms"] = round(statistics.median(waits) * 1000, 1)
        out[f"{who}_wait_p90_ms"] = round(_pct(waits, 0.9) * 1000, 1)
        out[f"{who}_wait_max_ms"] = round(max(waits) * 1000, 1)
        out[f"{who}_wait_mean_ms"] = round(statistics.fmean(waits) * 1000, 1)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--clients", type=int, default=8, help="concurrent clients per key")
    p.add_argument("--requests", type=int, default=25, help="requests per client")
    p.add_argument("--delay", type=float, default=0.05, help="the backend's seconds per answer")
    args = p.parse_args()
    print(json.dumps(run(args.clients, args.requests, args.delay), indent=2))


if __name__ == "__main__":
    main()
