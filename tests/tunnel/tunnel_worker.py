"""A minimal worker behind a tunnel, as its own process: register, heartbeat, ``TunnelClient``.

``python tests/tunnel/tunnel_worker.py --coordinator URL --token T --name N --service fake=URL``

It reports the given services healthy and serves them through the real tunnel client; it does
not start them (the caller did).  Used where a test needs a tunnel worker that
can be killed on its own (SIGKILL: the tunnel dies with it); ``rma worker join`` is the real
agent and is what the end-to-end tests use otherwise.  Prints ``{"worker_id": ...}`` once the
tunnel is up.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
from typing import Any

import httpx

from rma.agent.tunnel import TunnelClient


async def main(args: argparse.Namespace) -> None:
    endpoints = dict(s.split("=", 1) for s in args.service)
    caps = {"cpu_cores": 2, "memory_mb": 4096, "disk_free_mb": 10000, "os": "linux"}
    async with httpx.AsyncClient(base_url=args.coordinator, timeout=10) as http:
        body = {
            "token": args.token,
            "name": args.name,
            "capabilities": caps,
            "transport": "tunnel",
            "runnable": list(endpoints),
        }
        r = await http.post("/api/worker/register", json=body)
        r.raise_for_status()
        reg = r.json()
        credential = reg["credential"]
        services = [
            {"name": s, "state": "running", "healthy": True, "endpoint": None} for s in endpoints
        ]
        client = TunnelClient(args.coordinator, lambda: credential, endpoints.get, True)
        tunnel = asyncio.create_task(client.run())
        await asyncio.wait_for(client.wait_connected(), 15)
        print(json.dumps({"worker_id": reg["worker_id"]}), flush=True)
        try:
            while True:
                r = await http.post(
                    "/api/worker/heartbeat",
                    json={"services": services},
                    headers={"authorization": f"Bearer {credential}"},
                )
                if r.status_code == 200:
                    credential = r.json().get("credential") or credential
                await asyncio.sleep(args.heartbeat)
        finally:
            tunnel.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await tunnel


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--coordinator", required=True)
    p.add_argument("--token", required=True)
    p.add_argument("--name", default="tunnel-worker")
    p.add_argument("--service", action="append", default=[], help="NAME=URL (repeatable)")
    p.add_argument("--heartbeat", type=float, default=1.0)
    return p.parse_args(argv)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main(parse(sys.argv[1:])))


def start(
    coordinator: str, token: str, services: dict[str, str], name: str = "tunnel-worker"
) -> Any:
    """Start this helper as a process; returns ``(Popen, worker_id)`` once its tunnel is up.

    (The benchmark has its own, ``bench/tunnel_worker.py``.)
    """
    import subprocess

    args = [sys.executable, __file__, "--coordinator", coordinator, "--token", token]
    args += ["--name", name]
    for svc, url in services.items():
        args += ["--service", f"{svc}={url}"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    proc.stdout.close()
    if not line:
        raise RuntimeError(f"tunnel worker exited with {proc.wait(5)}")
    return proc, json.loads(line)["worker_id"]
