"""Demand-driven scaling with real agents: ``rma worker join`` processes run the fake backend
(200 ms per answer, catalog capacity 2); under c=16 the coordinator scales ``fake`` from 1 to at
least 3 replicas, and back to 1 after the quiet period; no request fails meanwhile."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path
from typing import Any

import pytest
from test_agents import kill_machine, start_agent
from test_load import async_sdk

from rma.catalog import load_catalog

FAKE_BACKEND = Path(__file__).resolve().parents[2] / "bench" / "fake_backend.py"

pytestmark = pytest.mark.slow

CATALOG = f"""
[services.fake]
tier = 3
kind = "openai"
models = ["fake-model"]
command = ["{{python}}", "{FAKE_BACKEND}", "--port", "{{port}}", "--delay", "0.2"]
health = "/health"
replicas = 1
max_replicas = 4
capacity = 2
"""

ENV = {
    "RMA_HEARTBEAT_INTERVAL": "1",
    "RMA_SCALE_INTERVAL": "0.5",
    "RMA_SCALE_UP_WINDOW": "2",
    "RMA_SCALE_DOWN_AFTER": "4",
    "RMA_SCALE_COOLDOWN": "1",
    "RMA_QUEUE_TIMEOUT": "60",
}


def services(pool: Any) -> dict[str, Any]:
    with pool.coord.admin() as c:
        return {s["name"]: s for s in c.get("/api/admin/services").json()}


async def wait_until(cond: Any, within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.5)


async def test_replicas_follow_demand_with_real_agents(pool_factory: Any, tmp_path: Path) -> None:
    never = "".join(
        f'[services.{n}]\nlabels = {{ rma_test_never = "1" }}\n'
        for n in load_catalog()
        if n != "fake"
    )
    pool = pool_factory(env=ENV, catalog_text=CATALOG + never)
    agents = [start_agent(pool, tmp_path, f"agent-{i}") for i in range(4)]
    failures: list[str] = []
    stop = asyncio.Event()
    try:
        await wait_until(lambda: services(pool)["fake"]["healthy"] == 1, 90, "one healthy replica")
        client = async_sdk(pool)

        async def user() -> None:
            while not stop.is_set():
                try:
                    await client.chat.completions.create(
                        model="fake-model", messages=[{"role": "user", "content": "hi"}]
                    )
                except Exception as exc:  # every failure counts
                    failures.append(repr(exc))

        users = [asyncio.create_task(user()) for _ in range(16)]
        try:
            await wait_until(
                lambda: services(pool)["fake"]["healthy"] >= 3, 120, "three healthy replicas"
            )
        finally:
            stop.set()
            await asyncio.gather(*users)
            await client.close()
        assert failures == []
        assert services(pool)["fake"]["last_scaling_event"].startswith("fake scaled up")
        await wait_until(lambda: services(pool)["fake"]["assigned"] == 1, 90, "back to one")
        assert services(pool)["fake"]["last_scaling_event"].startswith("fake scaled down")
    finally:
        for proc in agents:
            with contextlib.suppress(Exception):
                kill_machine(proc)
