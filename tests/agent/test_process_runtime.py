"""The process runtime with real subprocesses: process groups, logs, orphans of a crashed agent."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from rma.agent.health import probe, probe_client
from rma.agent.runtimes.base import RuntimeFailure, free_port
from rma.agent.runtimes.process import ProcessRuntime
from rma.schemas.api import ServiceSpec

from .conftest import procs_with, wait_for

# A service that forks a grandchild (same process group) and serves HTTP: stopping it must stop
# both.  The grandchild sleeps with a marker in its command line so the test can find it.
FORKING = [
    "{python}",
    "-c",
    "import subprocess, sys, http.server as h;"
    "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)',"
    " 'grandchild-{data_dir}']);"
    "h.test(HandlerClass=h.SimpleHTTPRequestHandler, port={port}, bind='127.0.0.1')",
]


def spec(name: str = "svc", command: list[str] | None = None, **kw: object) -> ServiceSpec:
    return ServiceSpec.model_validate(
        {"name": name, "command": command or FORKING, "health": "/", **kw}
    )


async def test_start_probe_stop_the_whole_group(tmp_path: Path) -> None:
    rt = ProcessRuntime(tmp_path)
    port = free_port()
    svc_dir = tmp_path / "services" / "svc"
    handle = await rt.start(spec(), port, svc_dir)
    http = probe_client()
    try:
        assert await rt.exit_status(handle) is None
        wait_for(lambda: procs_with(f"grandchild-{svc_dir}"), 20)

        async def healthy() -> bool:
            ok, _ = await probe(http, "127.0.0.1", port, "/")
            return ok

        for _ in range(100):
            if await healthy():
                break
            await asyncio.sleep(0.1)
        assert await healthy()
        assert os.getpgid(int(handle.ref)) == int(handle.ref)  # its own process group
        assert (tmp_path / "run" / "svc.json").exists()
    finally:
        await rt.stop("svc", handle, grace=5)
        await http.aclose()
    assert not procs_with(f"grandchild-{svc_dir}")  # the grandchild went with the group
    assert (
        not psutil.pid_exists(int(handle.ref))
        or psutil.Process(int(handle.ref)).status() == "zombie"
    )
    assert not (tmp_path / "run" / "svc.json").exists()
    log = (tmp_path / "logs" / "svc.log").read_text()
    assert "rma starts:" in log


async def test_exit_code_and_log_tail_are_reported(tmp_path: Path) -> None:
    rt = ProcessRuntime(tmp_path)
    cmd = ["{python}", "-c", "import sys; print('bad config: port {port}'); sys.exit(3)"]
    handle = await rt.start(spec(command=cmd), free_port(), tmp_path / "svc")
    for _ in range(100):
        if await rt.exit_status(handle):
            break
        await asyncio.sleep(0.05)
    assert await rt.exit_status(handle) == "exited with code 3"
    assert "bad config: port" in rt.log_tail(handle)
    await rt.stop("svc", handle, grace=1)


async def test_orphans_of_a_crashed_agent_are_stopped(tmp_path: Path) -> None:
    """An agent killed with SIGKILL leaves its services running; the next one on the same data
    dir finds them through run/<service>.json and stops the whole group."""
    first = ProcessRuntime(tmp_path)
    svc_dir = tmp_path / "services" / "svc"
    handle = await first.start(spec(), free_port(), svc_dir)
    wait_for(lambda: procs_with(f"grandchild-{svc_dir}"), 20)
    leader = psutil.Process(int(handle.ref))
    # `first` is dropped without stopping anything: what a SIGKILLed agent leaves behind
    second = ProcessRuntime(tmp_path)
    cleaned = await second.cleanup()
    assert cleaned == [f"svc (pid {handle.ref})"]
    handle.detail.wait(10)  # reap the leader (this test process is its parent)
    assert not leader.is_running()
    wait_for(lambda: not procs_with(f"grandchild-{svc_dir}"), 10)
    assert not list((tmp_path / "run").glob("*.json"))
    assert await ProcessRuntime(tmp_path).cleanup() == []  # nothing twice


async def test_a_recycled_pid_is_not_killed(tmp_path: Path) -> None:
    """A record whose pid now belongs to a process older than the record is left alone."""
    run = tmp_path / "run"
    run.mkdir()
    other = subprocess.Popen(  # noqa: ASYNC220 - a test fixture process
        [sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True
    )
    try:
        created = psutil.Process(other.pid).create_time() + 3600  # recorded "later"
        record = {"service": "old", "pid": other.pid, "pgid": other.pid, "created": created}
        (run / "old.json").write_text(json.dumps(record))
        assert await ProcessRuntime(tmp_path).cleanup() == []
        assert other.poll() is None
        assert not (run / "old.json").exists()
    finally:
        other.kill()
        other.wait()


def test_what_the_process_runtime_cannot_run(tmp_path: Path) -> None:
    rt = ProcessRuntime(tmp_path)
    assert rt.unavailable(spec()) is None
    no_cmd = ServiceSpec(name="img", image="some/image")
    assert "no command" in (rt.unavailable(no_cmd) or "")
    missing_bin = spec(command=["definitely-not-installed-rma-binary", "{port}"])
    assert "is not installed" in (rt.unavailable(missing_bin) or "")
    missing_mod = spec(requires=["rma_no_such_module_xyz"], extra="local")
    reason = rt.unavailable(missing_mod) or ""
    assert "rma_no_such_module_xyz" in reason
    assert "pip install 'rma-pool[local]'" in reason


async def test_starting_what_cannot_run_is_a_failure(tmp_path: Path) -> None:
    rt = ProcessRuntime(tmp_path)
    with pytest.raises(RuntimeFailure, match="not installed"):
        await rt.start(spec(command=["definitely-not-installed-rma-binary"]), free_port(), tmp_path)


def test_placeholders(tmp_path: Path) -> None:
    from rma.agent.runtimes.base import expand

    assert expand("{python} {port} {data_dir}", port=5, data_dir=tmp_path) == (
        f"{sys.executable} 5 {tmp_path}"
    )
