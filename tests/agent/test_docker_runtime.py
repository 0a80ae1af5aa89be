"""The docker runtime against a real Docker engine and a locally built image (no registry can be
reached): .ci/docker-setup.sh starts dockerd and builds rma-test/httpd (busybox httpd on $PORT,
host networking)."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from rma.agent.health import probe, probe_client
from rma.agent.reconcile import Reconciler
from rma.agent.runtimes.base import RuntimeFailure, free_port
from rma.agent.state import agent_key
from rma.catalog import load_catalog
from rma.schemas.api import Resources, ServiceSpec
from rma.schemas.enums import ServiceState

from .conftest import (
    DOCKER_CATALOG,
    TEST_IMAGE,
    admin_workers,
    docker_client,
    http_ok,
    root_conftest,
)
from .conftest import wait_for as wait_sync

pytestmark = [pytest.mark.docker, pytest.mark.slow]


@pytest.fixture
def engine() -> Iterator[Any]:
    client = docker_client()
    yield client
    client.close()


@pytest.fixture
def catalog_file(tmp_path: Path) -> Path:
    path = tmp_path / "docker-catalog.toml"
    path.write_text(DOCKER_CATALOG)
    return path


def ours(engine: Any, key: str) -> list[Any]:
    return list(engine.containers.list(all=True, filters={"label": [f"rma.agent={key}"]}))


@pytest.fixture
def runtime(engine: Any, tmp_path: Path) -> Iterator[Any]:
    from rma.agent.runtimes.docker import DockerRuntime

    rt = DockerRuntime.connect(tmp_path, agent_key=agent_key(tmp_path))
    yield rt
    for c in ours(engine, rt.agent_key):
        c.remove(force=True)
    rt.client.close()


async def until(check: Callable[[], Any], within: float = 30) -> Any:
    deadline = time.monotonic() + within
    while not (value := await check() if asyncio.iscoroutinefunction(check) else check()):
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.1)
    return value


def web(catalog_file: Path) -> ServiceSpec:
    return load_catalog(catalog_file)["web"]


async def test_run_probe_and_remove_a_container(
    runtime: Any, engine: Any, catalog_file: Path, tmp_path: Path
) -> None:
    spec = web(catalog_file)
    await runtime.prepare(spec, lambda line: None)  # present locally: nothing to pull
    port = free_port()
    handle = await runtime.start(spec, port, tmp_path / "services" / "web")
    http = probe_client()
    try:

        async def healthy() -> bool:
            return (await probe(http, "127.0.0.1", port, "/"))[0]

        await until(healthy)
        assert await runtime.exit_status(handle) is None
        (c,) = ours(engine, runtime.agent_key)
        assert c.labels["rma.managed"] == "true"
        assert c.labels["rma.service"] == "web"
        assert c.name == runtime.container_name("web")
        host_config = c.attrs["HostConfig"]
        assert host_config["Memory"] == 64 * 1024 * 1024
        assert host_config["NanoCpus"] == 500_000_000
        if runtime.network == "host":
            assert host_config["NetworkMode"] == "host"
            assert f"PORT={port}" in c.attrs["Config"]["Env"]
        else:
            assert c.attrs["HostConfig"]["PortBindings"]["8000/tcp"][0]["HostPort"] == str(port)
    finally:
        await runtime.stop("web", handle, grace=2)
        await http.aclose()
    assert ours(engine, runtime.agent_key) == []


async def test_leftovers_of_a_crashed_agent_are_removed_by_label(
    runtime: Any, engine: Any, catalog_file: Path, tmp_path: Path
) -> None:
    from rma.agent.runtimes.docker import DockerRuntime

    await runtime.start(web(catalog_file), free_port(), tmp_path / "services" / "web")
    other_dir = tmp_path / "another-agent"
    other = DockerRuntime.connect(other_dir, agent_key=agent_key(other_dir))
    kept = await other.start(web(catalog_file), free_port(), other_dir / "web")
    try:
        # the same data dir after a crash: a new runtime object finds and removes the container
        again = DockerRuntime.connect(tmp_path, agent_key=agent_key(tmp_path))
        cleaned = await again.cleanup()
        assert cleaned == [f"web (container {runtime.container_name('web')})"]
        assert ours(engine, runtime.agent_key) == []
        assert [c.id[:12] for c in ours(engine, other.agent_key)] == [kept.ref]  # not ours: kept
        again.client.close()
    finally:
        await other.stop("web", kept, grace=0)
        other.client.close()


async def test_a_pull_failure_is_a_failed_service_not_a_crash(
    runtime: Any, catalog_file: Path, tmp_path: Path
) -> None:
    spec = load_catalog(catalog_file)["nopull"]
    with pytest.raises(RuntimeFailure, match="cannot pull registry.invalid/rma/does-not-exist:1"):
        await runtime.prepare(spec, lambda line: None)

    rec = Reconciler(runtime, tmp_path, health_timeout=10, probe_interval=0.2)
    try:
        rec.set_desired([spec])
        await rec.run_once()
        unit = rec.units["nopull"]
        await until(lambda: unit.state is ServiceState.FAILED, 60)
        assert "cannot pull" in (unit.message or "")
        (status,) = rec.statuses()
        assert status.state is ServiceState.FAILED
        assert status.healthy is False
    finally:
        await rec.stop_all(grace=0)
        await rec.aclose()


async def test_a_container_that_exits_is_restarted(
    runtime: Any, engine: Any, catalog_file: Path, tmp_path: Path
) -> None:
    rec = Reconciler(
        runtime, tmp_path, health_timeout=20, probe_interval=0.3, restart_base=0.2, restart_cap=1
    )
    try:
        rec.set_desired([web(catalog_file)])
        await rec.run_once()
        unit = rec.units["web"]
        await until(lambda: unit.healthy, 60)
        first = unit.handle.ref if unit.handle else ""
        engine.containers.get(first).kill()
        await until(lambda: unit.state is ServiceState.CRASHED, 30)
        assert "exited with code" in (unit.message or "")
        await until(lambda: unit.healthy and unit.handle and unit.handle.ref != first, 60)
        assert unit.restarts == 1
        assert len(ours(engine, runtime.agent_key)) == 1
    finally:
        await rec.stop_all(grace=0)
        await rec.aclose()
    assert ours(engine, runtime.agent_key) == []


def test_agent_with_docker_end_to_end(
    engine: Any, catalog_file: Path, tmp_path: Path, database_url: str, agent_factory: Any
) -> None:
    """join (docker runtime) -> web healthy, nopull failed with a message -> SIGKILL -> restart:
    the orphan container is removed and web comes back -> SIGTERM: no container left."""
    coord = root_conftest().start_coordinator(
        tmp_path / "coord",
        database_url=database_url,
        extra_args=["--catalog", str(catalog_file)],
        env={"RMA_HEARTBEAT_INTERVAL": "1"},
    )
    args = ["--runtime", "docker", "--transport", "direct", "--catalog", str(catalog_file)]
    args += ["--label", "rma.services=web,nopull"]
    try:
        first = agent_factory(coord.url, "--token", coord.token(), *args)
        key = agent_key(first.data_dir)

        def settled() -> dict[str, Any] | None:
            for w in admin_workers(coord):
                svc = {s["name"]: s for s in w["services"]}
                if (
                    svc.get("web", {}).get("healthy")
                    and svc.get("nopull", {}).get("state") == "failed"
                ):
                    return w
            return None

        w = wait_sync(settled, 90, every=0.5)
        svc = {s["name"]: s for s in w["services"]}
        assert "cannot pull" in svc["nopull"]["message"]
        assert http_ok(svc["web"]["endpoint"] + "/")
        assert sorted(w["assignments"]) == ["nopull", "web"]
        (orphan,) = ours(engine, key)

        first.signal(signal.SIGKILL)
        first.wait(10)
        orphan.reload()
        assert orphan.status == "running"  # outlived its agent

        second = agent_factory(coord.url, *args, data_dir=first.data_dir)

        def back() -> dict[str, Any] | None:
            found = ours(engine, key)
            hw = settled()
            if hw and found and found[0].id != orphan.id:
                return hw
            return None

        again = wait_sync(back, 90, every=0.5)
        assert again["id"] == w["id"]
        assert len(ours(engine, key)) == 1
        assert "left by an earlier run of this agent" in second.output()

        second.signal(signal.SIGTERM)
        assert second.wait(60) == 0, second.output()
        assert ours(engine, key) == []
        (left,) = admin_workers(coord)
        assert left["status"] == "left"
    finally:
        coord.stop()
        for c in engine.containers.list(all=True, filters={"label": ["rma.managed=true"]}):
            if c.labels.get("rma.agent") == agent_key(tmp_path / "worker"):
                c.remove(force=True)


def test_image_is_the_local_test_image(engine: Any) -> None:
    image = engine.images.get(TEST_IMAGE)
    assert image.attrs["Config"]["Env"]  # PORT default set by docker-setup.sh


async def test_donor_limits_cap_each_container(
    engine: Any, catalog_file: Path, tmp_path: Path
) -> None:
    from rma.agent.policy import Limits
    from rma.agent.runtimes.docker import DockerRuntime

    rt = DockerRuntime.connect(
        tmp_path, agent_key=agent_key(tmp_path), limits=Limits(cpu=0.25, memory_mb=32)
    )
    loose = web(catalog_file).model_copy(update={"resources": Resources()})
    try:
        # the spec asks for 64 MB and 0.5 CPU: the donor's 32 MB and 0.25 CPU win
        handle = await rt.start(web(catalog_file), free_port(), tmp_path / "services" / "web")
        (c,) = ours(engine, rt.agent_key)
        assert c.attrs["HostConfig"]["Memory"] == 32 * 1024 * 1024
        assert c.attrs["HostConfig"]["NanoCpus"] == 250_000_000
        await rt.stop("web", handle, grace=0)
        # a spec that declares nothing still gets the donor's limits
        handle = await rt.start(loose, free_port(), tmp_path / "services" / "web")
        (c,) = ours(engine, rt.agent_key)
        assert c.attrs["HostConfig"]["Memory"] == 32 * 1024 * 1024
        assert c.attrs["HostConfig"]["NanoCpus"] == 250_000_000
        await rt.stop("web", handle, grace=0)
        assert rt.describe()["limits"]["memory"] == "mem_limit: at most 32 MB per container"
    finally:
        for c in ours(engine, rt.agent_key):
            c.remove(force=True)
        rt.client.close()


async def test_host_networking_listens_on_loopback_only(
    engine: Any, catalog_file: Path, tmp_path: Path
) -> None:
    """`{host}` in a catalog's args is 127.0.0.1 when the container shares the host's network."""
    from rma.agent.runtimes.docker import DockerRuntime

    runtime = DockerRuntime.connect(tmp_path, agent_key=agent_key(tmp_path), network="host")
    spec = web(catalog_file).model_copy(
        update={"args": ["/bin/busybox", "httpd", "-f", "-p", "{host}:{port}", "-h", "/www"]}
    )
    port = free_port()
    http = probe_client()
    try:
        handle = await runtime.start(spec, port, tmp_path / "services" / "web")

        async def healthy() -> bool:
            return (await probe(http, "127.0.0.1", port, "/"))[0]

        await until(healthy)
        (c,) = ours(engine, runtime.agent_key)
        assert f"127.0.0.1:{port}" in c.attrs["Args"]
        await runtime.stop("web", handle, grace=2)
    finally:
        for c in ours(engine, runtime.agent_key):
            c.remove(force=True)
        runtime.client.close()
        await http.aclose()


async def test_builtin_images_come_from_the_operators_prefix(
    engine: Any, catalog_file: Path, tmp_path: Path
) -> None:
    """`RMA_IMAGE_PREFIX` replaces the catalog's `rma/`: rma/web:latest runs PREFIX + web:latest."""
    from rma.agent.runtimes.docker import DockerRuntime

    engine.images.get(TEST_IMAGE).tag("rma-prefix-test/web", "latest")
    runtime = DockerRuntime.connect(
        tmp_path, agent_key=agent_key(tmp_path), image_prefix="rma-prefix-test/"
    )
    spec = web(catalog_file).model_copy(update={"image": "rma/web:latest"})
    lines: list[str] = []
    port = free_port()
    try:
        await runtime.prepare(spec, lines.append)  # found locally under the prefix: no pull
        assert lines == []
        handle = await runtime.start(spec, port, tmp_path / "services" / "web")
        (c,) = ours(engine, runtime.agent_key)
        assert "rma-prefix-test/web:latest" in c.image.tags
        await runtime.stop("web", handle, grace=2)
    finally:
        for c in ours(engine, runtime.agent_key):
            c.remove(force=True)
        runtime.client.close()
        engine.images.remove("rma-prefix-test/web:latest")
