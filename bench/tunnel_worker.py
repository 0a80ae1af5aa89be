"""A worker behind a tunnel for the benchmark: register, heartbeat, the real ``TunnelClient``.

``python bench/tunnel_worker.py --coordinator URL --token T --service NAME=URL ...``

It reports the given services healthy and serves them through :class:`rma.agent.tunnel.
TunnelClient`, the agent's own tunnel code, exactly as ``rma worker join`` runs it (plain
``asyncio``); it does not start the services (the benchmark did: the fake backends).  Prints
``{"worker_id": ...}`` once the tunnel is up.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import subprocess
import sys

import httpx

from rma.agent.tunnel import TunnelClient

CAPS = {"cpu_cores": 2, "memory_mb": 4096, "disk_free_mb": 10000, "os": "linux"}


async def main(args: argparse.Namespace) -> None:
    endpoints = dict(s.split("=", 1) for s in args.service)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with httpx.AsyncClient(base_url=args.coordinator, timeout=10) as http:
        body = {
            "token": args.token,
            "name": args.name,
            "capabilities": CAPS,
            "transport": "tunnel",
            "runnable": list(endpoints),
        }
        r = await http.post("/api/worker/register", json=body)
        r.raise_for_status()
        reg = r.json()
        credential: str = reg["credential"]
        services = [{"name": s, "state": "running", "healthy": True} for s in endpoints]
        client = TunnelClient(args.coordinator, lambda: credential, endpoints.get, True)
        tunnel = asyncio.create_task(client.run())
        try:
            await asyncio.wait_for(client.wait_connected(), 15)
            print(json.dumps({"worker_id": reg["worker_id"]}), flush=True)
            while not stop.is_set():
                r = await http.post(
                    "/api/worker/heartbeat",
                    json={"services": services},
                    headers={"authorization": f"Bearer {credential}"},
                )
                if r.status_code == 200:
                    credential = r.json().get("credential") or credential
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), args.heartbeat)
        finally:
            tunnel.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await tunnel


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--coordinator", required=True)
    p.add_argument("--token", required=True)
    p.add_argument("--name", default="bench-tunnel")
    p.add_argument("--service", action="append", default=[], help="NAME=URL (repeatable)")
    p.add_argument("--heartbeat", type=float, default=5.0)
    p.add_argument("--uvloop", action="store_true", help="uvloop instead of asyncio's loop")
    return p.parse_args(argv)


def start(
    coordinator: str, token: str, services: dict[str, str], name: str = "bench-tunnel"
) -> tuple[subprocess.Popen[bytes], str]:
    """Start this worker as a process; ``(Popen, worker_id)`` once its tunnel is up."""
    cmd = [sys.executable, __file__, "--coordinator", coordinator, "--token", token]
    cmd += ["--name", name]
    for svc, url in services.items():
        cmd += ["--service", f"{svc}={url}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    proc.stdout.close()
    if not line:
        raise SystemExit(f"the tunnel worker exited with {proc.wait(5)}")
    return proc, str(json.loads(line)["worker_id"])


if __name__ == "__main__":
    args = parse(sys.argv[1:])
    with contextlib.suppress(KeyboardInterrupt):
        if args.uvloop:
            import uvloop

            uvloop.run(main(args))
        else:
            asyncio.run(main(args))
