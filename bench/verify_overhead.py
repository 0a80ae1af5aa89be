"""The verification benchmark: how fast a liar is caught and what verification costs.

``python -m bench.verify_overhead [--requests 600] [--delay 0.02] [--out FILE]`` starts, on
this machine, a real coordinator and five fake embeddings backends (``bench/fake_backend.py``,
answering in ``--delay`` seconds), one of them lying
(``--lie``: random vectors), registered as direct workers of a service with
``verify = "cosine:0.99"``.  It sends embeddings requests one after the other and reports:

- the liar: its verified results and disagreements when it was quarantined, how many client
  requests it answered before, and how many wrong answers clients got in all;
- the extra worker load: (requests the backends received - client requests) / client requests,
  over the whole run and over its last third (the steady state, once the honest workers are
  established);
- the client's p50 latency, and the p50 with ``x-rma-verify: quorum`` (which waits for two
  answers) for comparison.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
BACKEND = ROOT / "bench" / "fake_backend.py"
DIM = 16
HONEST = [(i % 17) / 17 for i in range(DIM)]
CATALOG = """
[services.emb]
description = "fake embeddings, verified by cosine similarity"
tier = 3
kind = "openai"
models = ["fake-embed"]
task = "embeddings"
replicas = 16
verify = "cosine:0.99"
"""
CAPS = {"cpu_cores": 2, "memory_mb": 4096, "disk_free_mb": 10000, "os": "linux", "arch": "x86_64"}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_http(url: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: the process exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.05)
    raise RuntimeError(f"{url} did not come up")


def _cos(x: list[float], y: list[float]) -> float:
    dot = sum(a * b for a, b in zip(x, y, strict=True))
    return dot / (math.sqrt(sum(a * a for a in x)) * math.sqrt(sum(b * b for b in y)))


def run(requests: int, delay: float) -> dict[str, Any]:
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory() as tmp:
        try:
            backends: dict[str, str] = {}
            for name in ("honest1", "honest2", "honest3", "honest4", "liar"):
                port = _port()
                cmd = [sys.executable, str(BACKEND), "--port", str(port), "--name", name]
                cmd += ["--dim", str(DIM), "--delay", str(delay)]
                cmd += ["--lie"] if name == "liar" else []
                procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL))
                backends[name] = f"http://127.0.0.1:{port}"
                _wait_http(backends[name] + "/health", procs[-1])
            catalog = Path(tmp) / "catalog.toml"
            catalog.write_text(CATALOG)
            port = _port()
            cmd = [sys.executable, "-m", "rma", "coordinator", "serve", "--port", str(port)]
            cmd += ["--data-dir", f"{tmp}/data", "--catalog", str(catalog)]
            cmd += ["--log-level", "warning"]
            procs.append(subprocess.Popen(cmd, env=os.environ.copy()))
            url = f"http://127.0.0.1:{port}"
            _wait_http(url + "/healthz", procs[-1])
            return _measure(url, Path(tmp) / "data", backends, requests)
        finally:
            for p in procs:
                p.send_signal(signal.SIGTERM)
            for p in procs:
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()


def _measure(url: str, data: Path, backends: dict[str, str], n: int) -> dict[str, Any]:
    admin = httpx.Client(
        base_url=url,
        headers={"authorization": f"Bearer {(data / 'admin.key').read_text().strip()}"},
        timeout=30,
    )
    with admin:
        key = admin.post("/api/admin/keys", json={"name": "bench"}).json()["key"]
        token = admin.post("/api/admin/tokens", json={"uses": None}).json()["token"]
        for name, base in backends.items():
            body = {"token": token, "name": name, "capabilities": CAPS, "transport": "direct"}
            r = httpx.post(url + "/api/worker/register", json={**body, "runnable": ["emb"]})
            cred = r.json()["credential"]
            hb = {"services": [{"name": "emb", "state": "running", "healthy": True,
                                "endpoint": base}]}  # fmt: skip
            httpx.post(
                url + "/api/worker/heartbeat", json=hb, headers={"authorization": f"Bearer {cred}"}
            ).raise_for_status()

        def posts() -> int:
            return sum(httpx.get(b + "/health").json()["posts"] for b in backends.values())

        client = httpx.Client(base_url=url, headers={"authorization": f"Bearer {key}"}, timeout=30)
        latencies: list[float] = []
        wrong = served_by_liar = 0
        caught: dict[str, Any] | None = None
        marks: list[tuple[int, int]] = []  # (client requests, backend posts)
        with client:
            for i in range(n):
                if i % (n // 3) == 0:
                    time.sleep(0.5)  # let the background re-runs of the last third finish
                    marks.append((i, posts()))
                t0 = time.perf_counter()
                r = client.post("/v1/embeddings", json={"model": "fake-embed", "input": "x"})
                latencies.append(time.perf_counter() - t0)
                vec = r.json()["data"][0]["embedding"]
                wrong += _cos(vec, HONEST) < 0.999
                served_by_liar += r.headers["x-rma-worker"] == "liar"
                if caught is None:
                    liar = next(w for w in admin.get("/api/admin/workers").json()
                                if w["name"] == "liar")  # fmt: skip
                    if liar["quarantined"]:
                        caught = {"after_requests": i + 1, "verified": liar["verified"],
                                  "disagreements": liar["disagreements"],
                                  "liar_answers_before": served_by_liar}  # fmt: skip
            time.sleep(0.5)
            marks.append((n, posts()))
            quorum: list[float] = []
            for _ in range(min(100, n)):
                t0 = time.perf_counter()
                client.post(
                    "/v1/embeddings",
                    json={"model": "fake-embed", "input": "x"},
                    headers={"x-rma-verify": "quorum"},
                )
                quorum.append(time.perf_counter() - t0)
        workers = admin.get("/api/admin/workers").json()
    (a, pa), (b, pb) = marks[0], marks[-1]
    (c, pc) = marks[-2]
    return {
        "requests": n,
        "liar": caught,
        "wrong_answers_to_clients": wrong,
        "extra_load_all": round((pb - pa - (b - a)) / (b - a), 4),
        "extra_load_steady": round((pb - pc - (b - c)) / (b - c), 4),
        "p50_ms": round(statistics.median(latencies) * 1000, 2),
        "p50_quorum_ms": round(statistics.median(quorum) * 1000, 2),
        "reputation": {w["name"]: w["reputation"] for w in workers},
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--requests", type=int, default=600, help="client requests (sequential)")
    p.add_argument("--delay", type=float, default=0.02, help="backend seconds per answer")
    p.add_argument("--out", type=Path, help="write the results here as JSON")
    args = p.parse_args()
    result = {"delay_s": args.delay, **run(args.requests, args.delay)}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
