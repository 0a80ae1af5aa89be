"""The agent in-process (its loops and one-step methods) against a real coordinator process:
what happens when the coordinator goes away, comes back, or forgets the worker."""

from __future__ import annotations

import asyncio
import stat
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from rma.agent.agent import Agent, AgentExit
from rma.agent.hardware import DockerInfo, detect
from rma.agent.runtimes.process import ProcessRuntime
from rma.catalog import load_catalog
from rma.schemas.enums import ServiceState
from rma.settings import WorkerSettings

from .conftest import admin_workers, http_ok, root_conftest

pytestmark = pytest.mark.slow


def make_agent(url: str, token: str | None, data_dir: Path, catalog: Path) -> Agent:
    settings = WorkerSettings(
        coordinator_url=url,
        token=token,
        name="inproc",
        labels={"rma.services": "echo"},
        runtime="process",
        transport="direct",
        catalog=catalog,
        data_dir=data_dir,
        drain_timeout=2,
    )
    caps = detect(data_dir, docker=DockerInfo(False, reason="not needed")).capabilities
    return Agent(
        settings,
        runtime=ProcessRuntime(data_dir),
        catalog=load_catalog(catalog),
        capabilities=caps,
        probe_interval=0.5,
        reconcile_interval=0.5,
        retry_cap=1.0,
    )


async def until(check: Callable[[], Any], within: float = 30) -> Any:
    deadline = time.monotonic() + within
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.1)


def key_of(path: Path) -> tuple[str, int]:
    """The key in a key file, and the file's mode."""
    return path.read_text().strip(), stat.S_IMODE(path.stat().st_mode)


def env_of(agent: Agent, name: str) -> dict[str, str]:
    unit = agent.reconciler.units[name]
    return dict(unit.spec.env)


def echo_pid(agent: Agent) -> int | None:
    unit = agent.reconciler.units.get("echo")
    return int(unit.handle.ref) if unit and unit.handle and unit.healthy else None


@pytest.fixture
async def running(
    coordinator: Any, tmp_path: Path, echo_catalog: Path
) -> AsyncIterator[tuple[Agent, asyncio.Task[int]]]:
    agent = make_agent(coordinator.url, coordinator.token(), tmp_path / "w", echo_catalog)
    async with agent:
        task = asyncio.create_task(agent.run())
        await until(lambda: echo_pid(agent) and agent.last_heartbeat)
        yield agent, task
        if not task.done():
            agent.request_stop()
            await asyncio.wait_for(task, 60)


async def test_one_step_at_a_time(coordinator: Any, tmp_path: Path, echo_catalog: Path) -> None:
    agent = make_agent(coordinator.url, coordinator.token(), tmp_path / "w", echo_catalog)
    async with agent:
        reg = await agent.register_once()
        assert [s.name for s in reg.assignments] == ["echo"]
        ident = tmp_path / "w" / "worker.json"
        assert stat.S_IMODE(ident.stat().st_mode) == 0o600
        await agent.reconcile_once()
        await until(lambda: echo_pid(agent))
        resp = await agent.heartbeat_once()
        assert resp.status.value == "online"
        (w,) = admin_workers(coordinator)
        assert w["services"][0]["healthy"] is True
        assert http_ok(w["services"][0]["endpoint"] + "/")
        await agent.leave()
        (w,) = admin_workers(coordinator)
        assert w["status"] == "left"
        assert agent.reconciler.units == {}


async def test_coordinator_down_services_keep_running(
    running: tuple[Agent, asyncio.Task[int]],
    coordinator: Any,
    database_url: str,
    echo_catalog: Path,
) -> None:
    agent, task = running
    pid = echo_pid(agent)
    port = int(coordinator.url.rsplit(":", 1)[1])
    coordinator.stop()

    await until(lambda: agent.last_heartbeat and not agent.last_heartbeat["ok"])
    assert "cannot reach the coordinator" in agent.last_heartbeat["error"]
    await asyncio.sleep(2)  # several failed heartbeats, with backoff
    assert not task.done()
    assert echo_pid(agent) == pid  # its service was left alone
    assert agent.reconciler.units["echo"].state is ServiceState.RUNNING

    again = root_conftest().start_coordinator(
        coordinator.data_dir,
        port=port,
        database_url=database_url,
        extra_args=["--catalog", str(echo_catalog)],
        env={"RMA_HEARTBEAT_INTERVAL": "1"},
    )
    try:
        await until(lambda: agent.last_heartbeat and agent.last_heartbeat["ok"])
        (w,) = admin_workers(again)
        assert w["status"] == "online"
        assert echo_pid(agent) == pid
    finally:
        agent.request_stop()
        assert await asyncio.wait_for(task, 60) == 0
        again.stop()


async def test_a_coordinator_that_forgot_the_worker_gets_it_again(
    running: tuple[Agent, asyncio.Task[int]],
    coordinator: Any,
    database_url: str,
    echo_catalog: Path,
) -> None:
    """The coordinator restarts without the worker's record (say, a restored backup): the next
    heartbeat is refused as unknown_worker and the agent registers again, services untouched."""
    from sqlalchemy import text

    from rma.coordinator.db import make_engine

    agent, task = running
    old_id = agent.worker_id
    pid = echo_pid(agent)
    port = int(coordinator.url.rsplit(":", 1)[1])
    coordinator.stop()
    engine = make_engine(database_url)
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM worker"))
    engine.dispose()

    again = root_conftest().start_coordinator(
        coordinator.data_dir,
        port=port,
        database_url=database_url,
        extra_args=["--catalog", str(echo_catalog)],
        env={"RMA_HEARTBEAT_INTERVAL": "1"},
    )
    try:
        await until(lambda: agent.worker_id != old_id)
        await until(lambda: any(w["services"] for w in admin_workers(again)))
        (w,) = admin_workers(again)
        assert w["id"] == agent.worker_id
        assert w["services"][0]["healthy"] is True
        assert agent.identity is not None
        assert agent.identity.worker_id == w["id"]  # the new identity was saved
        assert echo_pid(agent) == pid
        assert not task.done()
    finally:
        agent.request_stop()
        await asyncio.wait_for(task, 60)
        again.stop()


async def test_unreachable_at_start_keeps_trying_until_stopped(
    tmp_path: Path, echo_catalog: Path
) -> None:
    port = root_conftest().free_port()
    agent = make_agent(f"http://127.0.0.1:{port}", "rma_join_x.y", tmp_path / "w", echo_catalog)
    async with agent:
        task = asyncio.create_task(agent.run())
        await asyncio.sleep(2.5)
        assert not task.done()  # still retrying, with backoff
        agent.request_stop()
        assert await asyncio.wait_for(task, 10) == 0


async def test_second_stop_is_immediate(
    running: tuple[Agent, asyncio.Task[int]], coordinator: Any
) -> None:
    agent, task = running
    pid = echo_pid(agent)
    assert pid is not None
    agent.request_stop()
    agent.request_stop()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 10)
    assert agent.forced


async def test_removed_ends_the_run(
    running: tuple[Agent, asyncio.Task[int]], coordinator: Any
) -> None:
    agent, task = running
    with coordinator.admin() as c:
        c.delete(f"/api/admin/workers/{agent.worker_id}").raise_for_status()
    with pytest.raises(AgentExit, match="removed by the operator"):
        await asyncio.wait_for(task, 30)


async def test_services_get_the_gateway_and_the_workers_own_key(
    coordinator: Any, tmp_path: Path, echo_catalog: Path
) -> None:
    import psutil

    agent = make_agent(coordinator.url, coordinator.token(), tmp_path / "w", echo_catalog)
    async with agent:
        reg = await agent.register_once()
        assert reg.service_key  # this coordinator requires client API keys
        await agent.reconcile_once()
        pid = await until(lambda: echo_pid(agent))
        env = psutil.Process(pid).environ()
        assert env["RMA_GATEWAY_URL"] == coordinator.url
        key_file = Path(env["RMA_API_KEY_FILE"])
        assert key_of(key_file) == (reg.service_key, 0o600)
        assert "RMA_API_KEY" not in env  # the file, so a re-join's new key needs no restart
        again = await agent.register_once()  # a new key, the same specs: nothing restarts
        assert again.service_key and again.service_key != reg.service_key
        assert key_of(key_file) == (again.service_key, 0o600)
        assert agent.with_pool_env(again.assignments)[0].env == env_of(agent, "echo")
        await agent.leave()
