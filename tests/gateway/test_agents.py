"""Failover through real agents: two ``rma worker join --transport direct`` processes run the
fake backend (process runtime) for a real coordinator; one machine dies (SIGKILL) mid-load.

The catalog keeps the built-in services (LLM, OCR, ...) off these workers: only ``fake`` runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import psutil
import pytest
from test_load import run_load

pytestmark = pytest.mark.slow


def start_agent(pool, tmp_path: Path, name: str) -> subprocess.Popen[bytes]:
    args = ["--coordinator", pool.url, "--token", pool.coord.token(), "--name", name]
    args += ["--transport", "direct", "--runtime", "process", "--catalog", str(pool.catalog)]
    args += ["--data-dir", str(tmp_path / name)]
    with open(tmp_path / f"{name}.log", "ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "rma", "worker", "join", *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "RMA_HEARTBEAT_INTERVAL": "1"},
        )


def kill_machine(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the agent and everything it started, as if the machine died."""
    try:
        family = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        family = []
    proc.send_signal(signal.SIGKILL)
    for p in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(signal.SIGKILL)
    proc.wait(10)


def healthy_workers(pool) -> list[str]:
    with pool.coord.admin() as c:
        workers = c.get("/api/admin/workers").json()
    return [
        w["name"]
        for w in workers
        if w["status"] == "online"
        and any(s["name"] == "fake" and s["healthy"] for s in w["services"])
    ]


async def test_sigkill_a_real_agent_mid_load(pool_factory, tmp_path, test_services_catalog) -> None:
    pool = pool_factory(env={"RMA_HEARTBEAT_INTERVAL": "1"}, catalog_text=test_services_catalog)
    agents = {n: start_agent(pool, tmp_path, n) for n in ("agent-a", "agent-b")}
    try:
        deadline = time.monotonic() + 90
        while sorted(healthy_workers(pool)) != ["agent-a", "agent-b"]:
            if time.monotonic() > deadline:
                logs = {n: (tmp_path / f"{n}.log").read_text()[-2000:] for n in agents}
                pytest.fail(f"the agents' services did not become healthy: {logs}")
            await asyncio.sleep(0.5)
        by_backend_pid: Counter[str] = Counter()
        killed: list[int] = []

        async def kill_b(done: int) -> None:
            if done == 60 and not killed:
                kill_machine(agents["agent-b"])
                killed.append(done)

        results = await run_load(pool, n=240, concurrency=16, on_progress=kill_b)
        assert killed
        for tag, answer in results:
            assert answer.startswith(tag + " from fake-"), answer
            by_backend_pid[answer.split()[-1]] += 1
        assert len(by_backend_pid) == 2  # both machines served before one died
        async with httpx.AsyncClient() as c:
            metrics = (await c.get(pool.url + "/metrics")).text
        assert 'status="502"' not in metrics
    finally:
        for proc in agents.values():
            if proc.poll() is None:
                kill_machine(proc)
