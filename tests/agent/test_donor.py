"""Donors protected from the pool: a real ``rma worker join`` against a hostile (fake) coordinator
and a real one; the donor's limits on real processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import psutil
import pytest

from .conftest import (
    DOCKER_CATALOG,
    ECHO_CATALOG,
    admin_workers,
    docker_client,
    procs_with,
    wait_for,
)

pytestmark = pytest.mark.slow


class FakeCoordinator:
    """A small real HTTP server that speaks the worker API and assigns whatever a test says."""

    def __init__(self, assignments: list[dict[str, Any]]) -> None:
        self.assignments = assignments
        self.heartbeats: list[dict[str, Any]] = []
        self.registered: list[dict[str, Any]] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                if self.path == "/api/worker/register":
                    fake.registered.append(body)
                    expires = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
                    answer: dict[str, Any] | None = {
                        "worker_id": "w-fake",
                        "tier": 3,
                        "tier_name": "data",
                        "credential": "fake-credential",
                        "credential_expires_at": expires,
                        "heartbeat_interval": 0.5,
                        "assignments": fake.assignments,
                    }
                elif self.path == "/api/worker/heartbeat":
                    fake.heartbeats.append(body)
                    answer = {
                        "assignments": fake.assignments,
                        "heartbeat_interval": 0.5,
                        "status": "online",
                    }
                else:
                    answer = None
                data = json.dumps(answer).encode() if answer is not None else b""
                self.send_response(200 if answer is not None else 204)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeCoordinator:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)

    def reported(self) -> dict[str, dict[str, Any]]:
        """The services of the last heartbeat, by name."""
        if not self.heartbeats:
            return {}
        return {s["name"]: s for s in self.heartbeats[-1]["services"]}


def touch(path: Path) -> list[str]:
    return ["sh", "-c", f"touch {path}"]


@pytest.fixture
def catalog_file(tmp_path: Path) -> Path:
    path = tmp_path / "donor-catalog.toml"
    path.write_text(ECHO_CATALOG)
    return path


def join_args(catalog: Path, *extra: str) -> list[str]:
    return ["--runtime", "process", "--transport", "direct", "--catalog", str(catalog), *extra]


def test_a_hostile_coordinator_gets_nothing_run(
    tmp_path: Path, agent_factory: Any, catalog_file: Path
) -> None:
    owned = {n: tmp_path / f"owned-by-{n}" for n in ("redis", "echo", "evil")}
    assignments = [
        # a built-in name and a name from the donor's catalog, with the attacker's command
        {"name": "redis", "tier": 3, "command": touch(owned["redis"]), "health": "tcp"},
        {"name": "echo", "tier": 3, "command": touch(owned["echo"]), "health": "/"},
        # a name the donor never defined
        {"name": "evil", "tier": 3, "command": touch(owned["evil"]), "health": "/"},
    ]
    with FakeCoordinator(assignments) as fake:
        agent = agent_factory(fake.url, "--token", "x", *join_args(catalog_file))
        reported = wait_for(
            lambda: (
                (r := fake.reported())
                and all(r.get(n, {}).get("state") == "refused" for n in owned)
                and r
            ),
            60,
        )
        # the refusal says why, in the heartbeat and in the agent's log
        assert "command" in reported["redis"]["message"]
        assert "command" in reported["echo"]["message"]
        assert "not defined in this donor's catalog" in reported["evil"]["message"]
        assert all(not s["healthy"] for s in reported.values())
        n = len(fake.heartbeats)
        wait_for(lambda: len(fake.heartbeats) >= n + 2, 30)  # and it stays so
        assert agent.alive()
        log = agent.output()
        for name in owned:
            assert f"refused the assignment {name}" in log
    for path in owned.values():
        assert not path.exists(), f"{path} was created: the agent ran the coordinator's command"


def test_trusting_the_coordinator_is_an_explicit_choice_and_still_no_bind_mounts(
    tmp_path: Path, agent_factory: Any, catalog_file: Path
) -> None:
    made = tmp_path / "made-by-the-coordinators-definition"
    assignments = [
        {"name": "echo", "tier": 3, "command": touch(made), "health": "/"},
        {
            "name": "web",
            "tier": 3,
            "image": "busybox",
            "command": touch(tmp_path / "never"),
            "volumes": {"/data": str(tmp_path)},
        },
    ]
    with FakeCoordinator(assignments) as fake:
        agent = agent_factory(
            fake.url, "--token", "x", *join_args(catalog_file), "--trust-coordinator-catalog"
        )
        wait_for(made.exists, 60)  # opted in: the coordinator's definition runs
        reported = wait_for(
            lambda: fake.reported().get("web", {}).get("state") == "refused" and fake.reported(), 60
        )
        assert "mounts host path" in reported["web"]["message"]
        assert str(tmp_path) in reported["web"]["message"]
        assert agent.alive()
    assert not (tmp_path / "never").exists()


@pytest.mark.docker
def test_a_bind_mount_never_reaches_docker(tmp_path: Path, agent_factory: Any) -> None:
    from rma.agent.state import agent_key
    from rma.catalog import load_catalog

    engine = docker_client()
    catalog = tmp_path / "docker-catalog.toml"
    catalog.write_text(DOCKER_CATALOG)
    web = load_catalog(catalog)["web"].model_dump(mode="json")
    secret = tmp_path / "home"
    secret.mkdir()
    mount = {**web, "name": "mount", "volumes": {"/mnt": str(secret)}}
    data_dir = tmp_path / "worker"
    key = agent_key(data_dir)

    def ours() -> dict[str, Any]:
        found = engine.containers.list(all=True, filters={"label": [f"rma.agent={key}"]})
        return {c.labels["rma.service"]: c for c in found}

    try:
        with FakeCoordinator([web, mount]) as fake:
            agent_factory(
                fake.url, "--token", "x", "--runtime", "docker", "--transport", "direct",
                "--catalog", str(catalog), "--trust-coordinator-catalog", data_dir=data_dir,
            )  # fmt: skip
            reported = wait_for(
                lambda: (
                    (r := fake.reported()).get("web", {}).get("healthy")
                    and r.get("mount", {}).get("state") == "refused"
                    and r
                ),
                90,
                every=0.2,
            )
            assert str(secret) in reported["mount"]["message"]
            assert set(ours()) == {"web"}  # the donor's web runs; no container mounts the path
            mounts = ours()["web"].attrs["Mounts"]
            assert all(m.get("Source") != str(secret) for m in mounts)
    finally:
        for c in ours().values():
            c.remove(force=True)
        engine.close()


def test_the_allow_list_and_limits_reach_the_coordinator_and_the_status(
    tmp_path: Path, agent_factory: Any, catalog_file: Path
) -> None:
    from rma.catalog import load_catalog

    catalog = load_catalog(catalog_file)
    # the coordinator assigns the donor's own echo (runs, within the limits) and slow (not allowed)
    wanted = [catalog[n].model_dump(mode="json") for n in ("echo", "slow")]
    with FakeCoordinator(wanted) as fake:
        agent = agent_factory(
            fake.url,
            "--token", "x",
            *join_args(catalog_file),
            "--services", "echo",
            "--max-cpu", "1",
            "--max-memory", "256M",
            "--max-vram", "0",
        )  # fmt: skip
        reported = wait_for(
            lambda: (
                (r := fake.reported()).get("echo", {}).get("healthy")
                and r.get("slow", {}).get("state") == "refused"
                and r
            ),
            60,
        )
        assert "--services" in reported["slow"]["message"]
        # the service process itself runs within the limits
        (echo,) = [p for p in procs_with(str(agent.data_dir / "services" / "echo"))]
        assert len(echo.cpu_affinity()) == 1
        assert echo.rlimit(psutil.RLIMIT_DATA) == (256 << 20, 256 << 20)
        assert not procs_with(str(agent.data_dir / "services" / "slow"))
        (reg,) = fake.registered
        assert reg["runnable"] == ["echo"]  # not slow, nor any built-in
        assert reg["capabilities"]["cpu_cores"] == 1
        assert reg["capabilities"]["memory_mb"] <= 256
        assert reg["capabilities"]["gpus"] == []
        status = rma_json("worker", "status", "--json", "--data-dir", str(agent.data_dir))
        assert status["allowed_services"] == ["echo"]
        assert status["limits"] == {"cpu": 1.0, "memory_mb": 256, "vram_mb": 0}
        assert status["runtime"]["limits"]["memory"].startswith("RLIMIT_DATA 256 MB")
        human = rma("worker", "status", "--data-dir", str(agent.data_dir))
        assert human.returncode == 0, human.stderr
        assert "limits: cpu 1 (CPU affinity" in human.stdout
        assert "memory 256M (RLIMIT_DATA" in human.stdout
        assert "allowed: echo (this machine's definitions only)" in human.stdout


def test_services_not_in_the_catalog_are_a_usage_error(tmp_path: Path, catalog_file: Path) -> None:
    res = rma(
        "worker", "join", "--coordinator", "http://127.0.0.1:9", "--token", "x",
        "--data-dir", str(tmp_path / "w"), *join_args(catalog_file), "--services", "echo,nope",
    )  # fmt: skip
    assert res.returncode == 1
    assert res.stderr.strip().splitlines() == [
        "error: --services: nope not in this machine's catalog (built-in + --catalog)"
    ]


def test_the_real_coordinator_records_assignment_refused(
    tmp_path: Path, coordinator: Any, agent_factory: Any
) -> None:
    # the donor's echo differs from the coordinator's: it is refused, and the pool hears of it
    donor = tmp_path / "other-catalog.toml"
    donor.write_text(ECHO_CATALOG.replace('"--bind", "127.0.0.1"', '"--bind", "127.0.0.1", "-h"'))
    agent = agent_factory(
        coordinator.url,
        "--token", coordinator.token(),
        *join_args(donor, "--label", "rma.services=echo", "--name", "picky"),
    )  # fmt: skip

    def refused_event() -> dict[str, Any] | None:
        with coordinator.admin() as c:
            events = c.get("/api/admin/events").json()
        return next((e for e in events if e["kind"] == "assignment_refused"), None)

    event = wait_for(refused_event, 60, every=0.5)
    assert event["data"]["service"] == "echo"
    assert "command" in event["data"]["message"]
    assert "picky refused to run echo" in event["message"]
    (w,) = admin_workers(coordinator)
    (svc,) = w["services"]
    assert (svc["name"], svc["state"], svc["healthy"]) == ("echo", "refused", False)
    assert not procs_with(str(agent.data_dir / "services" / "echo"))


def test_process_limits_hold_in_the_service_process(tmp_path: Path) -> None:
    import asyncio

    from rma.agent.policy import Limits
    from rma.agent.runtimes.process import ProcessRuntime
    from rma.schemas.api import ServiceSpec

    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs two CPUs to see affinity cut down")
    probe = (
        "import os, sys\n"
        "cpus = len(os.sched_getaffinity(0))\n"
        "try:\n"
        "    b = bytearray(256 << 20); got = 'allocated'\n"
        "except MemoryError:\n"
        "    got = 'MemoryError'\n"
        "open(sys.argv[1], 'w').write(f'{cpus} {got}')\n"
    )

    async def run(limits: Limits | None, out: Path) -> None:
        rt = ProcessRuntime(tmp_path / f"rt-{out.name}", limits=limits)
        spec = ServiceSpec(name="probe", command=["{python}", "-c", probe, str(out)])
        handle = await rt.start(spec, 0, tmp_path / f"svc-{out.name}")
        try:
            while await rt.exit_status(handle) is None:  # noqa: ASYNC110 - a child process
                await asyncio.sleep(0.05)
        finally:
            await rt.stop("probe", handle, grace=0)

    asyncio.run(run(None, tmp_path / "free"))
    asyncio.run(run(Limits(cpu=1, memory_mb=128), tmp_path / "limited"))
    assert (tmp_path / "free").read_text() == f"{len(os.sched_getaffinity(0))} allocated"
    assert (tmp_path / "limited").read_text() == "1 MemoryError"


def rma(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rma", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "NO_COLOR": "1", "COLUMNS": "200"},
        check=False,
    )


def rma_json(*args: str) -> Any:
    res = rma(*args)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


@pytest.fixture(autouse=True)
def _no_leftovers(tmp_path: Path) -> Iterator[None]:
    yield
    for p in procs_with(str(tmp_path)):
        if p.pid != os.getpid():
            p.kill()
