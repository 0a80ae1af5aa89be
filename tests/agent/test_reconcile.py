"""The reconcile loop with the real process runtime: desired assignments vs what runs."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import pytest

from rma.agent.reconcile import Reconciler, Unit
from rma.agent.runtimes.process import ProcessRuntime
from rma.schemas.api import ServiceSpec
from rma.schemas.enums import ServiceState as S

ECHO = [
    "{python}",
    "-m",
    "http.server",
    "{port}",
    "--bind",
    "127.0.0.1",
    "--directory",
    "{data_dir}",
]


def spec(name: str = "echo", **kw: object) -> ServiceSpec:
    return ServiceSpec.model_validate({"name": name, "command": ECHO, "health": "/", **kw})


@pytest.fixture
async def rec(tmp_path: Path) -> AsyncIterator[tuple[Reconciler, list[tuple[str, S]]]]:
    seen: list[tuple[str, S]] = []

    def record(unit: Unit) -> None:
        seen.append((unit.name, unit.state))

    r = Reconciler(
        ProcessRuntime(tmp_path),
        tmp_path,
        health_timeout=20,
        probe_interval=0.2,
        stop_timeout=5,
        restart_base=0.2,
        restart_cap=1.0,
        on_change=record,
    )
    yield r, seen
    await r.stop_all(grace=0)
    await r.aclose()


async def until(check: Callable[[], object], within: float = 20) -> None:
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


def states(seen: list[tuple[str, S]], name: str) -> list[S]:
    return [s for n, s in seen if n == name]


async def test_start_probe_until_healthy_then_stop(
    rec: tuple[Reconciler, list[tuple[str, S]]],
) -> None:
    r, seen = rec
    assert r.set_desired([spec()])
    assert not r.set_desired([spec()])  # the same again: no change
    await r.run_once()
    await until(lambda: r.units["echo"].healthy)
    unit = r.units["echo"]
    assert states(seen, "echo") == [S.PENDING, S.STARTING, S.RUNNING]
    (status,) = r.statuses()
    assert status.endpoint == f"http://127.0.0.1:{unit.port}"
    assert status.healthy
    async with httpx.AsyncClient(trust_env=False) as c:
        assert (await c.get(f"{status.endpoint}/")).status_code == 200
    assert r.local_endpoint("echo") == status.endpoint
    pid = int(unit.handle.ref) if unit.handle else 0

    r.set_desired([])  # unassigned
    await r.run_once()
    assert "echo" not in r.units
    assert states(seen, "echo")[-2:] == [S.STOPPING, S.STOPPED]
    assert not _alive(pid)
    assert [(s.name, s.state) for s in r.statuses()] == [("echo", S.STOPPED)]  # reported once
    r.forget_stopped(["echo"])
    assert r.statuses() == []
    assert r.local_endpoint("echo") is None


async def test_a_crash_is_restarted_with_backoff(
    rec: tuple[Reconciler, list[tuple[str, S]]],
) -> None:
    r, seen = rec
    r.set_desired([spec()])
    await r.run_once()
    await until(lambda: r.units["echo"].healthy)
    unit = r.units["echo"]
    first = int(unit.handle.ref) if unit.handle else 0
    os.kill(first, signal.SIGKILL)
    await until(lambda: unit.state is S.CRASHED)
    assert "killed by SIGKILL" in (unit.message or "")
    assert "restart in" in (unit.message or "")
    await until(lambda: unit.healthy and unit.handle is not None and int(unit.handle.ref) != first)
    assert unit.restarts == 1
    assert states(seen, "echo")[-3:] == [S.CRASHED, S.STARTING, S.RUNNING]


async def test_a_service_that_keeps_dying_backs_off(
    rec: tuple[Reconciler, list[tuple[str, S]]],
) -> None:
    r, _ = rec
    dies = spec("dies", command=["{python}", "-c", "print('no config here'); raise SystemExit(3)"])
    r.set_desired([dies])
    await r.run_once()
    unit = r.units["dies"]
    await until(lambda: unit.restarts >= 3, 30)
    assert unit.state in (S.CRASHED, S.STARTING)
    assert not unit.healthy
    crashed = next(s for s in r.statuses() if s.name == "dies")
    assert crashed.endpoint is None or crashed.state is S.STARTING
    # the message says why: the exit code and the service's last words
    await until(lambda: unit.state is S.CRASHED)
    assert "exited with code 3 before it was healthy" in (unit.message or "")
    assert "no config here" in (unit.message or "")
    assert unit.backoff.attempts >= 3  # the delay grew (0.2, 0.4, 0.8, capped at 1.0)


async def test_what_cannot_run_fails_and_stays_failed(
    rec: tuple[Reconciler, list[tuple[str, S]]],
) -> None:
    r, seen = rec
    r.set_desired([spec("needy", requires=["rma_no_such_module_xyz"], extra="local")])
    await r.run_once()
    unit = r.units["needy"]
    await until(lambda: unit.state is S.FAILED)
    assert "rma_no_such_module_xyz" in (unit.message or "")
    await asyncio.sleep(0.5)
    assert unit.state is S.FAILED  # terminal: not retried
    assert unit.restarts == 0
    # a changed assignment (here: without the missing module) starts it afresh
    r.set_desired([spec("needy")])
    await r.run_once()
    await until(lambda: r.units["needy"].healthy)
    assert r.units["needy"] is not unit


async def test_never_healthy_is_a_crash(tmp_path: Path) -> None:
    r = Reconciler(
        ProcessRuntime(tmp_path),
        tmp_path,
        health_timeout=1.0,
        probe_interval=0.2,
        restart_base=5,
    )
    try:
        # listens, but answers 404 on the health path
        r.set_desired([spec("wrong", health="/no-such-page")])
        await r.run_once()
        unit = r.units["wrong"]
        await until(lambda: unit.state is S.CRASHED, 15)
        assert "not healthy after 1s" in (unit.message or "")
        assert "404" in (unit.message or "")
    finally:
        await r.stop_all(grace=0)
        await r.aclose()


async def test_unhealthy_while_running(rec: tuple[Reconciler, list[tuple[str, S]]]) -> None:
    r, _ = rec
    r.set_desired([spec(health="/ready")])
    data = r.data_dir / "services" / "echo"
    data.mkdir(parents=True)
    (data / "ready").write_text("ok")
    await r.run_once()
    unit = r.units["echo"]
    await until(lambda: unit.healthy)
    (data / "ready").unlink()  # the health path now answers 404
    await until(lambda: unit.state is S.UNHEALTHY)
    assert not unit.healthy
    assert r.local_endpoint("echo") is None
    (data / "ready").write_text("ok")
    await until(lambda: unit.state is S.RUNNING and unit.healthy)


async def test_a_changed_spec_restarts_the_service(
    rec: tuple[Reconciler, list[tuple[str, S]]],
) -> None:
    r, _ = rec
    r.set_desired([spec()])
    await r.run_once()
    await until(lambda: r.units["echo"].healthy)
    old = r.units["echo"]
    old_pid = int(old.handle.ref) if old.handle else 0
    r.set_desired([spec(env={"NEW": "1"})])
    await r.run_once()
    assert not _alive(old_pid)
    await until(lambda: r.units["echo"].healthy)
    assert r.units["echo"] is not old


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still "exists" until reaped; the runtime reaps its children
    with open(f"/proc/{pid}/stat") as fh:
        return fh.read().split(")")[-1].split()[0] != "Z"


STANDIN = str(Path(__file__).with_name("ollama_standin.py"))


async def test_models_are_pulled_with_progress_before_the_service_is_healthy(
    tmp_path: Path,
) -> None:
    """`model_pull = "ollama"`: each model is pulled through the service's own API (a stand-in
    for Ollama, which cannot run here), the progress shows in its status, and only then is it
    healthy."""
    messages: list[tuple[S, str | None]] = []
    r = Reconciler(ProcessRuntime(tmp_path), tmp_path, health_timeout=20, probe_interval=0.2,
                   stop_timeout=5, restart_base=0.2, restart_cap=1.0,
                   on_change=lambda u: messages.append((u.state, u.message)))  # fmt: skip
    pulling = ServiceSpec.model_validate({
        "name": "ollama", "command": ["{python}", STANDIN, "{port}"], "health": "/api/version",
        "kind": "openai", "models": ["tiny:1", "tiny:2"], "model_pull": "ollama",
    })  # fmt: skip
    seen: list[str] = []

    async def watch() -> None:  # status messages change without a state change: sample them
        while True:
            unit = r.units.get("ollama")
            if unit and unit.message and (not seen or seen[-1] != unit.message):
                seen.append(unit.message)
            await asyncio.sleep(0.01)

    watcher = asyncio.create_task(watch())
    try:
        r.set_desired([pulling])
        await r.run_once()
        unit = r.units["ollama"]
        await until(lambda: unit.healthy)
        pulled = (tmp_path / "services" / "ollama" / "pulled.txt").read_text().split()
        assert pulled == ["tiny:1", "tiny:2"]
        assert "pulling tiny:1: 50% of 4.0 GB" in seen, seen
        assert "pulling tiny:2: 100% of 4.0 GB" in seen, seen
        states = [s for s, _ in messages]
        assert S.PULLING in states
        assert S.PULLING not in states[states.index(S.RUNNING) :]
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
        await r.stop_all(grace=0)
        await r.aclose()


async def test_a_model_that_cannot_be_pulled_fails_the_service_with_the_reason(
    tmp_path: Path,
) -> None:
    messages: list[tuple[S, str | None]] = []
    r = Reconciler(ProcessRuntime(tmp_path), tmp_path, health_timeout=20, probe_interval=0.2,
                   stop_timeout=5, restart_base=5, restart_cap=5,
                   on_change=lambda u: messages.append((u.state, u.message)))  # fmt: skip
    broken = ServiceSpec.model_validate({
        "name": "ollama", "command": ["{python}", STANDIN, "{port}"], "health": "/api/version",
        "kind": "openai", "models": ["broken:1"], "model_pull": "ollama",
    })  # fmt: skip
    try:
        r.set_desired([broken])
        await r.run_once()
        await until(lambda: any(s is S.CRASHED for s, _ in messages))
        crashed = next(m for s, m in messages if s is S.CRASHED)
        assert crashed and "pulling broken:1: pull model manifest: file does not exist" in crashed
        assert not r.units["ollama"].healthy
    finally:
        await r.stop_all(grace=0)
        await r.aclose()
