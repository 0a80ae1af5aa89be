"""Fixtures for the agent: a test catalog with a real HTTP service, real coordinator and agent
processes, and a Docker engine when there is one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures" / "hardware"
TEST_IMAGE = os.environ.get("RMA_TEST_IMAGE", "rma-test/httpd:latest")

#: A catalog whose one service (tier 3, so any machine here hosts it) is Python's own HTTP server:
#: a real process the process runtime starts, probes and stops.  ``{data_dir}`` in its command
#: lets a test find the process (and its orphans) by its command line.
ECHO_CATALOG = """
[services.echo]
description = "test service: python -m http.server"
tier = 3
kind = "http"
command = [
  "{python}", "-m", "http.server", "{port}", "--bind", "127.0.0.1", "--directory", "{data_dir}",
]
health = "/"
[services.echo.resources]
memory_mb = 16

[services.slow]
description = "test service: answers /slow after 4 seconds (for draining)"
tier = 3
kind = "http"
command = ["{python}", "-c", '''
import http.server, sys, time
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path.startswith("/slow"):
            time.sleep(4)
        body = b"done"
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
''', "{port}"]
health = "/"
"""

#: The same service as a container of the local test image (.ci/docker-setup.sh builds it):
#: busybox httpd on the port in $PORT, host networking.
DOCKER_CATALOG = f"""
[services.web]
description = "test service: busybox httpd in a container"
tier = 3
kind = "http"
image = "{TEST_IMAGE}"
port = 8000
health = "/"
[services.web.env]
PORT = "{{port}}"
[services.web.resources]
memory_mb = 64
cpu_cores = 0.5

[services.nopull]
description = "an image no registry can give"
tier = 3
image = "registry.invalid/rma/does-not-exist:1"
health = "/"
"""


def root_conftest() -> Any:
    """``tests/conftest.py``, for ``start_coordinator`` and ``free_port``."""
    import tests.conftest

    return tests.conftest


def wait_for(check: Callable[[], Any], timeout: float = 30.0, every: float = 0.1) -> Any:
    """Poll ``check`` until it returns something truthy; fail with its last value."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(every)
    raise AssertionError(f"condition not met within {timeout}s (last: {last!r})")


def procs_with(text: str) -> list[psutil.Process]:
    """Live processes whose command line contains ``text`` (zombies do not count)."""
    found = []
    for p in psutil.process_iter(["cmdline", "status"]):
        try:
            if p.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            if text in " ".join(p.info["cmdline"] or []):
                found.append(p)
        except psutil.Error:
            continue
    return found


@pytest.fixture
def echo_catalog(tmp_path: Path) -> Path:
    path = tmp_path / "catalog.toml"
    path.write_text(ECHO_CATALOG)
    return path


@pytest.fixture
def coordinator(tmp_path: Path, database_url: str, echo_catalog: Path) -> Iterator[Any]:
    """A real coordinator with the echo catalog and 1-second heartbeats."""
    coord = root_conftest().start_coordinator(
        tmp_path / "coord",
        database_url=database_url,
        extra_args=["--catalog", str(echo_catalog)],
        env={"RMA_HEARTBEAT_INTERVAL": "1"},
    )
    yield coord
    coord.stop()


@dataclass
class AgentProcess:
    """A real ``rma worker join`` process."""

    args: list[str]
    data_dir: Path
    log: Path
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> AgentProcess:
        with open(self.log, "ab") as fh:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "rma", "worker", "join", *self.args],
                env={**os.environ, **self.env},
                stdout=fh,
                stderr=subprocess.STDOUT,
            )
        return self

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 30) -> int:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the agent did not exit:\n{self.output()}") from None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def agent_factory(tmp_path: Path) -> Iterator[Callable[..., AgentProcess]]:
    """Start agents; whatever a test leaves running (agents, their services) is killed after."""
    agents: list[AgentProcess] = []

    def make(
        coordinator_url: str,
        *args: str,
        data_dir: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> AgentProcess:
        dd = data_dir or tmp_path / "worker"
        n = len(agents)
        full = ["--coordinator", coordinator_url, "--data-dir", str(dd), *args]
        agent = AgentProcess(full, dd, tmp_path / f"agent-{n}.log", env=env or {})
        agents.append(agent)
        return agent.start()

    yield make
    for agent in agents:
        if agent.alive():
            agent.signal(signal.SIGKILL)
            agent.wait(10)
    for p in procs_with(str(tmp_path)):
        if p.pid != os.getpid():
            p.kill()


def admin_workers(coord: Any) -> list[dict[str, Any]]:
    with coord.admin() as c:
        r = c.get("/api/admin/workers")
        r.raise_for_status()
        return list(r.json())


def http_ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2, trust_env=False).status_code == 200
    except httpx.HTTPError:
        return False


def docker_client() -> Any:
    """A docker SDK client on a live engine with the test image, or skip saying what is missing."""
    from rma.agent.hardware import docker_info

    info = docker_info()
    if not info.available:
        pytest.skip(f"needs a Docker engine (run .ci/docker-setup.sh as root): {info.reason}")
    docker = pytest.importorskip(
        "docker", reason="needs the docker SDK: pip install 'rma-pool[docker]'"
    )
    client = docker.DockerClient.from_env(timeout=30)
    try:
        client.images.get(TEST_IMAGE)
    except docker.errors.ImageNotFound:
        client.close()
        pytest.skip(f"needs the test image {TEST_IMAGE}: run .ci/docker-setup.sh")
    return client
