"""Backups with the docker runtime, on the real Docker engine: ``pg_dumpall`` and ``psql`` run
inside the service's container (the engine's exec API), so a worker without PostgreSQL of its
own backs up and restores a containerised database; Redis's ``redis-rdb`` works through the
mounted folder.

Nothing can be pulled here, so the test builds its own PostgreSQL image from this machine's
PostgreSQL (its binaries and their libraries on the busybox test image); it skips when the
engine, the test image or PostgreSQL is missing.  The host's own PostgreSQL tools are made
unfindable for the backup code, as on a docker-only worker.
"""

from __future__ import annotations

import asyncio
import glob
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from rma.agent import backup
from rma.agent.programs import find_program
from rma.agent.reconcile import Reconciler
from rma.agent.state import agent_key
from rma.schemas.api import Resources, ServiceSpec

from .conftest import TEST_IMAGE, docker_client

pytestmark = [pytest.mark.docker, pytest.mark.slow]

IMAGE = "rma-test/postgres-tools:test"
#: initdb on the first start into /data/pgdata (the service's folder), then PostgreSQL on
#: 127.0.0.1:{port} (host networking) as the unprivileged user ``postgres``.
START = (
    "mkdir -p /data/pgdata && chown postgres /data/pgdata && chmod 700 /data/pgdata && "
    "(test -s /data/pgdata/PG_VERSION || su postgres -c "
    "'initdb -D /data/pgdata -U postgres --auth=trust >/dev/null') && "
    "exec su postgres -c 'exec postgres -D /data/pgdata -p {port} -h 127.0.0.1 -k \"\"'"
)


def _libraries(binaries: list[str]) -> set[str]:
    found: set[str] = set()
    for path in binaries:
        out = subprocess.run(["ldd", path], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            parts = line.split()
            if "=>" in parts and len(parts) > parts.index("=>") + 1:
                found.add(parts[parts.index("=>") + 1])
            elif parts and parts[0].startswith("/"):
                found.add(parts[0])
    return {p for p in found if os.path.isfile(p)}


def build_context(where: Path) -> Path:
    """This machine's PostgreSQL (binaries, extensions, share files, libraries) on busybox."""
    initdb = find_program("initdb")
    assert initdb is not None
    bindir = Path(os.path.realpath(initdb)).parent
    version = bindir.parent  # /usr/lib/postgresql/15
    share = Path("/usr/share/postgresql") / version.name
    root = where / "root"
    shutil.copytree(
        version,
        root / str(version).lstrip("/"),
        ignore=shutil.ignore_patterns("bitcode", "llvmjit*"),
    )
    if share.is_dir():
        shutil.copytree(share, root / str(share).lstrip("/"))
    programs = [str(bindir / p) for p in ("initdb", "postgres", "pg_dumpall", "psql")]
    programs += glob.glob(str(version / "lib" / "*.so"))
    redis = find_program("redis-server")
    if redis is not None:  # Redis too, where this machine has it (the redis-rdb test)
        real = os.path.realpath(redis)
        (root / "usr/bin").mkdir(parents=True, exist_ok=True)
        shutil.copy2(real, root / "usr/bin/redis-server")
        programs.append(real)
    for lib in _libraries(programs):
        dest = root / lib.lstrip("/")
        if not dest.exists():
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(os.path.realpath(lib), dest)
    (where / "Dockerfile").write_text(
        f"FROM {TEST_IMAGE}\nCOPY root/ /\n"
        'RUN echo "postgres:x:999:999::/data:/bin/sh" >> /etc/passwd && '
        'echo "postgres:x:999:" >> /etc/group\n'
        f"ENV PATH={bindir}:/bin:/usr/bin:/sbin:/usr/sbin\n"
        "WORKDIR /data\n"  # as in the redis:7 image: dump.rdb lands in the service's folder
    )
    return where


@pytest.fixture(scope="module")
def engine() -> Iterator[Any]:
    client = docker_client()
    yield client
    client.close()


@pytest.fixture(scope="module")
def pg_image(engine: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if find_program("initdb") is None:
        pytest.skip("needs PostgreSQL on this machine to build the test image")
    ctx = build_context(tmp_path_factory.mktemp("pg-image"))
    engine.images.build(path=str(ctx), tag=IMAGE, rm=True, forcerm=True)
    yield IMAGE
    engine.images.remove(IMAGE, force=True)


@pytest.fixture
def no_host_tools(monkeypatch: pytest.MonkeyPatch) -> None:
    """A docker-only worker: the backup code finds no PostgreSQL program on the host."""
    monkeypatch.setattr(backup, "find_program", lambda name: None)


def pg_spec(image: str) -> ServiceSpec:
    return ServiceSpec(
        name="postgres",
        tier=3,
        kind="tcp",
        image=image,
        args=["sh", "-c", START],
        port=5432,
        health="postgres",
        backup="pg_dumpall",
        resources=Resources(memory_mb=256),
    )


async def until(check: Callable[[], Any], within: float = 60) -> Any:
    deadline = time.monotonic() + within
    while not (value := check()):
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.2)
    return value


def psql_rows(port: int) -> int | None:
    import psycopg

    try:
        with psycopg.connect(
            host="127.0.0.1", port=port, user="postgres", dbname="postgres", connect_timeout=10
        ) as conn:
            row = conn.execute("SELECT count(*) FROM notes").fetchone()
    except psycopg.Error:
        return None
    return int(row[0]) if row else None


async def test_pg_dumpall_and_psql_run_inside_the_container(
    engine: Any, pg_image: str, tmp_path: Path, no_host_tools: None
) -> None:
    import psycopg

    from rma.agent.runtimes.docker import DockerRuntime

    spec = pg_spec(pg_image)
    taken = tmp_path / "taken.sql"
    runtimes = []
    recs: list[Reconciler] = []

    async def fetch(_: ServiceSpec, dest: Path, __: str | None) -> bool:
        shutil.copyfile(taken, dest)
        return True

    try:
        for name in ("a", "b"):  # a holds it first; b is the new holder that restores
            folder = tmp_path / name
            folder.mkdir()
            rt = DockerRuntime.connect(folder, agent_key=agent_key(folder))
            runtimes.append(rt)
            recs.append(
                Reconciler(rt, folder, health_timeout=60, probe_interval=0.3, fetch_backup=fetch)
            )
        a, b = recs
        taken.write_text("")  # a's first start: nothing to restore (an empty backup is none)
        a.fetch_backup = None
        a.set_desired([spec])
        await a.run_once()
        unit = a.units["postgres"]
        await until(lambda: unit.healthy)
        assert unit.port is not None
        with psycopg.connect(
            host="127.0.0.1", port=unit.port, user="postgres", dbname="postgres"
        ) as conn:
            conn.execute("CREATE TABLE notes (id int PRIMARY KEY)")
            conn.execute("INSERT INTO notes SELECT generate_series(1, 250)")

        await backup.take(spec, unit.port, a.service_dir("postgres"), taken, a.inside(unit))
        dump = taken.read_text()
        assert "CREATE TABLE public.notes" in dump and "COPY public.notes" in dump
        assert not list(a.service_dir("postgres").glob(".rma-*"))  # its file moved out
        with pytest.raises(backup.BackupError, match="pg_dumpall is not installed"):
            await backup.take(spec, unit.port, a.service_dir("postgres"), tmp_path / "host.sql")

        b.set_desired([spec])
        await b.run_once()
        other = b.units["postgres"]
        await until(lambda: other.healthy or other.state.value in ("crashed", "failed"))
        assert other.healthy, other.message
        assert other.restored
        assert other.port is not None and psql_rows(other.port) == 250
    finally:
        for rec in recs:
            await rec.stop_all(grace=5)
            await rec.aclose()
        for rt in runtimes:
            await rt.cleanup()
            await rt.aclose()


async def test_redis_rdb_through_the_mounted_folder(
    engine: Any, pg_image: str, tmp_path: Path
) -> None:
    """``SAVE`` over TCP, ``dump.rdb`` from the folder mounted at ``/data``; restored by putting
    it there before the new holder's container starts."""
    if find_program("redis-server") is None:
        pytest.skip("needs redis-server on this machine to build the test image")
    import redis

    from rma.agent.runtimes.docker import DockerRuntime

    spec = ServiceSpec(
        name="redis",
        tier=3,
        kind="tcp",
        image=pg_image,
        args=["redis-server", "--port", "{port}", "--bind", "127.0.0.1"],
        port=6379,
        health="redis",
        backup="redis-rdb",
        resources=Resources(memory_mb=128),
    )
    taken = tmp_path / "taken.rdb"

    async def fetch(_: ServiceSpec, dest: Path, __: str | None) -> bool:
        shutil.copyfile(taken, dest)
        return True

    runtimes = []
    recs: list[Reconciler] = []
    try:
        for name in ("a", "b"):
            folder = tmp_path / name
            folder.mkdir()
            rt = DockerRuntime.connect(folder, agent_key=agent_key(folder))
            runtimes.append(rt)
            recs.append(
                Reconciler(rt, folder, health_timeout=60, probe_interval=0.3, fetch_backup=fetch)
            )
        a, b = recs
        a.fetch_backup = None
        a.set_desired([spec])
        await a.run_once()
        unit = a.units["redis"]
        await until(lambda: unit.healthy)
        assert unit.port is not None
        r = redis.Redis(host="127.0.0.1", port=unit.port, socket_timeout=10)
        try:
            r.mset({f"k{i}": f"v{i}" for i in range(100)})
        finally:
            r.close()
        await backup.take(spec, unit.port, a.service_dir("redis"), taken, a.inside(unit))
        assert taken.read_bytes().startswith(b"REDIS")

        b.set_desired([spec])
        await b.run_once()
        other = b.units["redis"]
        await until(lambda: other.healthy or other.state.value in ("crashed", "failed"))
        assert other.healthy and other.restored, other.message
        assert other.port is not None
        r = redis.Redis(host="127.0.0.1", port=other.port, socket_timeout=10)
        try:
            assert r.get("k99") == b"v99" and r.dbsize() == 100
        finally:
            r.close()
    finally:
        for rec in recs:
            await rec.stop_all(grace=5)
            await rec.aclose()
        for rt in runtimes:
            await rt.cleanup()
            await rt.aclose()
