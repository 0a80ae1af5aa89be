"""Computing preferences: the checker with injected sources (no I/O), then a real in-process
agent against a real coordinator process that pauses and resumes as the sources change."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from rma.agent.agent import Agent
from rma.agent.hardware import DockerInfo, detect
from rma.agent.prefs import Preferences, PrefsChecker, in_hours, parse_hours, save_prefs
from rma.agent.runtimes.process import ProcessRuntime
from rma.catalog import load_catalog
from rma.settings import WorkerSettings

from .conftest import admin_workers, procs_with


@dataclass
class FakeSources:
    idle: float | None = 3600.0
    cpu: float = 0.0
    battery: bool = False
    clock: datetime = field(default_factory=lambda: datetime(2026, 12, 1, 12, 0))

    def input_idle(self) -> float | None:
        return self.idle

    def others_cpu(self) -> float:
        return self.cpu

    def on_battery(self) -> bool:
        return self.battery

    def now(self) -> datetime:
        return self.clock


def test_hours_wrap_midnight() -> None:
    night = parse_hours("22:00-07:00")
    assert in_hours(night, datetime(2026, 1, 1, 23, 30).time())
    assert in_hours(night, datetime(2026, 1, 1, 6, 59).time())
    assert not in_hours(night, datetime(2026, 1, 1, 7, 0).time())
    assert not in_hours(night, datetime(2026, 1, 1, 12, 0).time())
    two = parse_hours("9:00-12:00,14:00-24:00")
    assert in_hours(two, datetime(2026, 1, 1, 23, 59).time())
    assert not in_hours(two, datetime(2026, 1, 1, 13, 0).time())
    with pytest.raises(ValueError, match="HH:MM"):
        parse_hours("9-17")


def test_checker_input_idle_battery_hours() -> None:
    src = FakeSources()
    check = PrefsChecker(src).check
    prefs = Preferences(idle_minutes=5, hours="08:00-20:00")
    assert check(prefs) is None
    src.idle = 30
    assert "waiting for idle" in (check(prefs) or "")
    src.idle = 301
    assert check(prefs) is None
    src.battery = True
    assert "on battery" in (check(prefs) or "")
    assert check(prefs.model_copy(update={"on_battery": True})) is None
    src.battery = False
    src.clock = datetime(2026, 12, 1, 21, 0)
    assert "outside the hours 08:00-20:00" in (check(prefs) or "")
    assert check(Preferences()) is None  # no preferences: always serve


def test_checker_falls_back_to_others_cpu() -> None:
    src = FakeSources(idle=None, cpu=80.0)
    checker = PrefsChecker(src)
    prefs = Preferences(idle_minutes=2, cpu_idle_below=25)
    assert "others use 80% of the CPU" in (checker.check(prefs) or "")
    src.cpu = 5.0
    assert "quiet for" in (checker.check(prefs) or "")  # quiet, but not for 2 minutes yet
    src.clock = src.clock.replace(minute=1, second=59)
    assert "quiet for" in (checker.check(prefs) or "")
    src.clock = src.clock.replace(minute=2, second=0)
    assert checker.check(prefs) is None
    src.cpu = 30.0  # the owner is back: the quiet time starts over
    assert checker.check(prefs) is not None
    src.cpu = 5.0
    assert checker.check(prefs) is not None


# --- a real agent --------------------------------------------------------------------------------


async def until(check: Callable[[], Any], within: float = 60) -> Any:
    deadline = time.monotonic() + within
    while True:
        value = await asyncio.to_thread(check)
        if value:
            return value
        assert time.monotonic() < deadline, f"condition not met in time (last: {value!r})"
        await asyncio.sleep(0.2)


def the_worker(coord: Any) -> dict[str, Any]:
    (w,) = admin_workers(coord)
    return w


def serving(agent: Agent, coord: Any) -> bool:
    unit = agent.reconciler.units.get("echo")
    if unit is None or not unit.healthy or agent.paused:
        return False
    w = the_worker(coord)
    return w["status"] == "online" and any(s["healthy"] for s in w["services"])


def paused_for(agent: Agent, coord: Any, words: str) -> bool:
    if not agent.paused or words not in (agent.pause_reason or ""):
        return False
    if procs_with(str(agent.data_dir / "services" / "echo")):
        return False
    w = the_worker(coord)
    return w["status"] == "paused" and words in (w["pause_reason"] or "")


@pytest.mark.slow
async def test_agent_follows_its_preferences(
    coordinator: Any, tmp_path: Path, echo_catalog: Path
) -> None:
    data_dir = tmp_path / "w"
    save_prefs(data_dir, Preferences(idle_minutes=5))
    settings = WorkerSettings(
        coordinator_url=coordinator.url,
        token=coordinator.token(),
        name="prefs-box",
        labels={"rma.services": "echo"},
        runtime="process",
        transport="direct",
        catalog=echo_catalog,
        data_dir=data_dir,
        drain_timeout=5,
        check_interval=0.3,
    )
    caps = detect(data_dir, docker=DockerInfo(False, reason="not needed")).capabilities
    src = FakeSources(idle=3600)
    agent = Agent(
        settings,
        runtime=ProcessRuntime(data_dir),
        catalog=load_catalog(echo_catalog),
        capabilities=caps,
        probe_interval=0.5,
        reconcile_interval=0.5,
        retry_cap=1.0,
        sources=src,
    )
    async with agent:
        task = asyncio.create_task(agent.run())
        try:
            await until(lambda: serving(agent, coordinator))  # idle -> serving
            assert agent.status()["state"] == "serving"
            src.idle = 3.0  # the owner touched the keyboard
            await until(lambda: paused_for(agent, coordinator, "waiting for idle"))
            assert agent.status()["state"] == "waiting"
            src.idle = 301.0
            await until(lambda: serving(agent, coordinator))
            src.battery = True
            await until(lambda: paused_for(agent, coordinator, "on battery"))
            src.battery = False
            await until(lambda: serving(agent, coordinator))
            # hours, changed while it runs (the file is re-read)
            save_prefs(data_dir, Preferences(idle_minutes=5, hours="13:00-18:00"))
            await until(lambda: paused_for(agent, coordinator, "outside the hours 13:00-18:00"))
            src.clock = datetime(2026, 12, 1, 13, 0)
            await until(lambda: serving(agent, coordinator))
        finally:
            agent.request_stop()
            await asyncio.wait_for(task, 60)


def gateway_inflight(coord: Any, service: str) -> float:
    """``rma_gateway_inflight{service=...}`` from the coordinator's /metrics."""
    import httpx

    text = httpx.get(f"{coord.url}/metrics", timeout=10, trust_env=False).text
    for line in text.splitlines():
        if line.startswith("rma_gateway_inflight{") and f'service="{service}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.mark.slow
async def test_activity_pauses_after_the_request_in_flight(
    coordinator: Any, tmp_path: Path, echo_catalog: Path
) -> None:
    import httpx

    data_dir = tmp_path / "w"
    save_prefs(data_dir, Preferences(idle_minutes=1))
    settings = WorkerSettings(
        coordinator_url=coordinator.url,
        token=coordinator.token(),
        name="busy-box",
        labels={"rma.services": "slow"},
        runtime="process",
        transport="direct",
        catalog=echo_catalog,
        data_dir=data_dir,
        drain_timeout=30,
        check_interval=0.3,
    )
    caps = detect(data_dir, docker=DockerInfo(False, reason="not needed")).capabilities
    src = FakeSources(idle=3600)
    agent = Agent(
        settings,
        runtime=ProcessRuntime(data_dir),
        catalog=load_catalog(echo_catalog),
        capabilities=caps,
        probe_interval=0.5,
        reconcile_interval=0.5,
        retry_cap=1.0,
        sources=src,
    )
    with coordinator.admin() as c:
        key = c.post("/api/admin/keys", json={"name": "prefs"}).json()["key"]
    async with agent, httpx.AsyncClient(trust_env=False, timeout=30) as http:
        task = asyncio.create_task(agent.run())
        try:

            def healthy() -> bool:
                unit = agent.reconciler.units.get("slow")
                w = admin_workers(coordinator)
                if not (unit and unit.healthy and w and w[0]["status"] == "online"):
                    return False
                return any(x["name"] == "slow" and x["healthy"] for x in w[0]["services"])

            await until(healthy)
            unit = agent.reconciler.units["slow"]
            request = asyncio.create_task(
                http.get(
                    f"{coordinator.url}/api/services/slow/slow",
                    headers={"authorization": f"Bearer {key}"},
                )
            )
            await until(lambda: gateway_inflight(coordinator, "slow") > 0, 20)  # it is in
            await until(lambda: agent.local_inflight() > 0, 20)  # and the agent sees it
            src.idle = 1.0  # the owner is back
            await until(lambda: agent.paused, 10)  # within a check interval
            assert agent.reconciler.units.get("slow") is unit  # draining: still running
            resp = await asyncio.wait_for(request, 30)
            assert resp.status_code == 200 and resp.text == "done"
            await until(lambda: "slow" not in agent.reconciler.units, 30)
            assert the_worker(coordinator)["status"] == "paused"
        finally:
            agent.request_stop()
            await asyncio.wait_for(task, 60)
