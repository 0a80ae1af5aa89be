"""Drain hands over first, with real agents: the agent holding the only replica is stopped
(SIGINT: its graceful leave); its service is placed on the other agent, which starts it, and the
stopping agent lets go only then. Requests keep succeeding throughout."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from test_agents import kill_machine, start_agent
from test_load import async_sdk

from rma.catalog import load_catalog

pytestmark = pytest.mark.slow

FAKE_BACKEND = Path(__file__).resolve().parents[2] / "bench" / "fake_backend.py"
CATALOG = f"""
[services.fake]
tier = 3
kind = "openai"
models = ["fake-model"]
command = ["{{python}}", "{FAKE_BACKEND}", "--port", "{{port}}", "--delay", "0.02"]
health = "/health"
replicas = 1
"""


def holders(pool: Any) -> dict[str, bool]:
    with pool.coord.admin() as c:
        workers = c.get("/api/admin/workers").json()
    return {
        w["name"]: any(s["name"] == "fake" and s["healthy"] for s in w["services"])
        for w in workers
        if "fake" in w["assignments"]
    }


async def test_a_stopping_agent_hands_over_before_it_stops(
    pool_factory: Any, tmp_path: Path
) -> None:
    never = "".join(
        f'[services.{n}]\nlabels = {{ rma_test_never = "1" }}\n'
        for n in load_catalog()
        if n != "fake"
    )
    pool = pool_factory(env={"RMA_HEARTBEAT_INTERVAL": "1"}, catalog_text=CATALOG + never)
    agents = {n: start_agent(pool, tmp_path, n) for n in ("agent-a", "agent-b")}
    failures: list[str] = []
    answers = 0
    stop = asyncio.Event()
    try:
        deadline = time.monotonic() + 90
        while list(holders(pool).values()) != [True]:
            assert time.monotonic() < deadline, "no healthy replica"
            await asyncio.sleep(0.5)
        first = next(iter(holders(pool)))
        other = "agent-b" if first == "agent-a" else "agent-a"
        client = async_sdk(pool)

        async def user() -> None:
            nonlocal answers
            while not stop.is_set():
                try:
                    await client.chat.completions.create(
                        model="fake-model", messages=[{"role": "user", "content": "hi"}]
                    )
                    answers += 1
                except Exception as exc:
                    failures.append(repr(exc))
                await asyncio.sleep(0.05)

        users = [asyncio.create_task(user()) for _ in range(2)]
        try:
            agents[first].send_signal(signal.SIGINT)  # the graceful leave
            deadline = time.monotonic() + 90
            while agents[first].poll() is None:
                assert time.monotonic() < deadline, "the stopping agent did not exit"
                await asyncio.sleep(0.2)
            served_before = answers
            await asyncio.sleep(1)
        finally:
            stop.set()
            await asyncio.gather(*users)
            await client.close()
        assert failures == []
        assert answers > served_before  # the other agent serves now
        assert holders(pool) == {other: True}
    finally:
        for proc in agents.values():
            with contextlib.suppress(Exception):
                kill_machine(proc)
