"""Verification's cost to the client: latency of unverified requests, verification on vs off.

``python -m bench.verify_latency [--requests 2000] [--delay 0.01] [--block 100] [--out FILE]``
starts, on this machine, five honest fake embeddings backends (``bench/fake_backend.py``,
answering in ``--delay`` seconds) and two real coordinators that both use them as their five
direct workers:

- ``on``: the service has ``verify = "cosine:0.99"`` and the default rates; before measuring,
  a warm-up runs until every worker has enough agreeing verified results that its rate has
  decayed to the floor (``verify_rate_floor``, 5 %): the steady state of an honest pool;
- ``off``: the same service without ``verify`` (nothing is held back or re-run).

Then it sends ``--requests`` plain embeddings requests (no ``x-rma-verify`` header) to each,
sequentially over one kept-alive connection per coordinator, in alternating blocks of
``--block`` (``on`` first in even rounds, ``off`` first in odd ones) so that the machine's load
drifts alike over both, and reports the client latency p50 / p90 / p99 / mean of each, the
difference, and how many of the ``on`` requests were verified meanwhile.
"""

from __future__ import annotations

import argparse
import json
import math
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

from bench.verify_overhead import BACKEND, CAPS, CATALOG, DIM, _port, _wait_http

NAMES = ("w1", "w2", "w3", "w4", "w5")
#: The same service, not verified.
CATALOG_OFF = CATALOG.replace('verify = "cosine:0.99"\n', "")


def steady_streak() -> int:
    """Agreements after which the default rate is at its floor (``reputation.chance``)."""
    from rma.settings import CoordinatorSettings

    f = CoordinatorSettings.model_fields
    new, decay = f["verify_rate_new"].default, f["verify_decay"].default
    floor, first = f["verify_rate_floor"].default, f["verify_new_results"].default
    if floor <= 0 or new <= floor:
        return int(first)
    return int(first) + math.ceil(math.log(floor / new) / math.log(decay)) - 1


class Coordinator:
    """One ``rma coordinator serve`` with the five workers registered and a client key."""

    def __init__(self, tmp: Path, name: str, catalog_text: str) -> None:
        catalog = tmp / f"{name}.toml"
        catalog.write_text(catalog_text)
        self.data = tmp / name
        port = _port()
        cmd = [sys.executable, "-m", "rma", "coordinator", "serve", "--port", str(port)]
        cmd += ["--data-dir", str(self.data), "--catalog", str(catalog), "--log-level", "warning"]
        self.proc = subprocess.Popen(cmd, env=os.environ.copy())
        self.url = f"http://127.0.0.1:{port}"
        _wait_http(self.url + "/healthz", self.proc)
        key = (self.data / "admin.key").read_text().strip()
        self.admin = httpx.Client(
            base_url=self.url, headers={"authorization": f"Bearer {key}"}, timeout=30
        )
        self.client: httpx.Client | None = None

    def register(self, backends: dict[str, str]) -> None:
        admin = self.admin
        key = admin.post("/api/admin/keys", json={"name": "bench", "rpm": 0}).json()["key"]
        token = admin.post("/api/admin/tokens", json={"uses": None}).json()["token"]
        for name, base in backends.items():
            body = {"token": token, "name": name, "capabilities": CAPS, "transport": "direct"}
            r = httpx.post(self.url + "/api/worker/register", json={**body, "runnable": ["emb"]})
            r.raise_for_status()
            hb = {"services": [{"name": "emb", "state": "running", "healthy": True,
                                "endpoint": base}]}  # fmt: skip
            auth = {"authorization": f"Bearer {r.json()['credential']}"}
            httpx.post(self.url + "/api/worker/heartbeat", json=hb, headers=auth).raise_for_status()
        self.client = httpx.Client(
            base_url=self.url, headers={"authorization": f"Bearer {key}"}, timeout=30
        )

    def verified(self) -> list[int]:
        return [int(w["verified"]) for w in self.admin.get("/api/admin/workers").json()]

    def call(self) -> float:
        """One embeddings request; its client latency in seconds."""
        assert self.client is not None
        t0 = time.perf_counter()
        r = self.client.post("/v1/embeddings", json={"model": "fake-embed", "input": "x"})
        took = time.perf_counter() - t0
        if r.status_code != 200:
            raise RuntimeError(f"{self.url}: {r.status_code} {r.text}")
        return took

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
        self.admin.close()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def _summary(latencies: list[float]) -> dict[str, float]:
    ms = sorted(x * 1000 for x in latencies)

    def pct(q: float) -> float:
        return round(ms[min(len(ms) - 1, int(q * len(ms)))], 2)

    return {
        "p50_ms": pct(0.50),
        "p90_ms": pct(0.90),
        "p99_ms": pct(0.99),
        "mean_ms": round(statistics.fmean(ms), 2),
        "max_ms": round(ms[-1], 2),
    }


def run(requests: int, delay: float, block: int) -> dict[str, Any]:
    procs: list[subprocess.Popen[bytes]] = []
    coords: list[Coordinator] = []
    with tempfile.TemporaryDirectory() as tmp:
        try:
            backends: dict[str, str] = {}
            for name in NAMES:
                port = _port()
                cmd = [sys.executable, str(BACKEND), "--port", str(port), "--name", name]
                cmd += ["--dim", str(DIM), "--delay", str(delay)]
                procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL))
                backends[name] = f"http://127.0.0.1:{port}"
                _wait_http(backends[name] + "/health", procs[-1])
            on = Coordinator(Path(tmp), "on", CATALOG)
            coords.append(on)
            off = Coordinator(Path(tmp), "off", CATALOG_OFF)
            coords.append(off)
            for c in coords:
                c.register(backends)
            return _measure(on, off, requests, block)
        finally:
            for c in coords:
                c.close()
            for p in procs:
                p.send_signal(signal.SIGTERM)
            for p in procs:
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()


def _measure(on: Coordinator, off: Coordinator, n: int, block: int) -> dict[str, Any]:
    need = steady_streak()
    warmup = 0
    started = time.monotonic()
    while min(on.verified()) < need:  # honest workers: verified == their streak of agreements
        for _ in range(20):
            on.call()
        warmup += 20
        if warmup > 20_000:
            raise RuntimeError(f"no steady state after {warmup} requests: {on.verified()}")
    for _ in range(50):
        off.call()  # the same warm connections and code paths
    time.sleep(0.5)  # the warm-up's last re-runs
    before = sum(on.verified())
    latencies: dict[str, list[float]] = {"on": [], "off": []}
    rounds = max(1, n // block)
    for r in range(rounds):
        order = [("on", on), ("off", off)] if r % 2 == 0 else [("off", off), ("on", on)]
        for name, coord in order:
            for _ in range(block):
                latencies[name].append(coord.call())
            time.sleep(0.05)  # a re-run of this block's last answer does not land in the next
    time.sleep(0.5)
    comparisons = (sum(on.verified()) - before) / 2  # each agreement counts on both workers
    on_s, off_s = _summary(latencies["on"]), _summary(latencies["off"])
    return {
        "requests_per_mode": rounds * block,
        "warmup_requests": warmup,
        "steady_streak": need,
        "verified_during_measurement": int(comparisons),
        "verified_share": round(comparisons / (rounds * block), 4),
        "on": on_s,
        "off": off_s,
        "added_ms": {k: round(on_s[k] - off_s[k], 2) for k in ("p50_ms", "p90_ms", "p99_ms")},
        "seconds": round(time.monotonic() - started, 1),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--requests", type=int, default=2000, help="measured requests per mode")
    p.add_argument("--delay", type=float, default=0.01, help="backend seconds per answer")
    p.add_argument("--block", type=int, default=100, help="requests per block (modes alternate)")
    p.add_argument("--out", type=Path, help="write the results here as JSON")
    args = p.parse_args()
    load = [round(x, 2) for x in os.getloadavg()]
    result = {"delay_s": args.delay, "load_average_start": load}
    result.update(run(args.requests, args.delay, args.block))
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
