"""The worker agent's idle footprint: ``python bench/agent_footprint.py [--seconds 60]``.

Starts a real coordinator and a real `rma worker join` (process runtime, one healthy service, the
default 30 s heartbeats) for each transport, lets start-up settle, then samples the agent's RSS
(peak) and CPU time with psutil for ``--seconds``.  Goal: under 60 MB and under 1 % of a core.
Prints one JSON object; docs/agent.md holds the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

CATALOG = """[services.echo]
tier = 3
command = ["{python}", "-m", "http.server", "{port}", "--bind", "127.0.0.1"]
health = "/"
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait(check: object, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():  # type: ignore[operator]
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise SystemExit("timed out")


def measure(transport: str, seconds: float, tmp: Path) -> dict[str, float | str]:
    catalog = tmp / "catalog.toml"
    catalog.write_text(CATALOG)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "RMA_DATA_DIR": str(tmp / f"coord-{transport}")}
    rma = [sys.executable, "-m", "rma"]
    coord = subprocess.Popen(
        [
            *rma,
            "coordinator",
            "serve",
            "--port",
            str(port),
            "--catalog",
            str(catalog),
            "--log-level",
            "warning",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    agent = None
    try:
        wait(lambda: httpx.get(url + "/healthz").status_code == 200, 30)
        key = (tmp / f"coord-{transport}" / "admin.key").read_text().strip()
        admin = {"authorization": f"Bearer {key}"}
        token = httpx.post(url + "/api/admin/tokens", json={"uses": 1}, headers=admin).json()[
            "token"
        ]
        agent = subprocess.Popen(
            [
                *rma,
                "worker",
                "join",
                "--coordinator",
                url,
                "--token",
                token,
                "--runtime",
                "process",
                "--transport",
                transport,
                "--catalog",
                str(catalog),
                "--label",
                "rma.services=echo",
                "--data-dir",
                str(tmp / f"worker-{transport}"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

        def healthy() -> bool:
            workers = httpx.get(url + "/api/admin/workers", headers=admin).json()
            return any(s["healthy"] for w in workers for s in w["services"])

        wait(healthy, 60)
        proc = psutil.Process(agent.pid)
        time.sleep(3)  # start-up work settles
        before = proc.cpu_times()
        start = time.monotonic()
        peak = 0
        while time.monotonic() - start < seconds:
            peak = max(peak, proc.memory_info().rss)
            time.sleep(0.5)
        after = proc.cpu_times()
        elapsed = time.monotonic() - start
        used = (after.user - before.user) + (after.system - before.system)
        return {
            "transport": transport,
            "seconds": round(elapsed, 1),
            "peak_rss_mb": round(peak / (1 << 20), 1),
            "cpu_percent": round(100 * used / elapsed, 3),
        }
    finally:
        for p in (agent, coord):
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGTERM)
                p.wait(30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=float, default=60)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [measure(t, args.seconds, Path(tmp)) for t in ("direct", "tunnel")]
    print(json.dumps({"load_average": os.getloadavg(), "agents": rows}, indent=2))


if __name__ == "__main__":
    main()
