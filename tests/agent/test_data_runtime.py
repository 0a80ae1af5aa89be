"""The data tier on the process runtime: the system's PostgreSQL and Redis started as the catalog
says, judged by their own protocols, backed up and restored into a fresh copy.

Skips (a failure under ``RMA_REQUIRE_ALL=1``) when initdb or redis-server is not installed.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from rma.agent import backup
from rma.agent.health import probe_protocol
from rma.agent.programs import find_program
from rma.agent.runtimes.base import Handle, free_port
from rma.agent.runtimes.process import ProcessRuntime
from rma.catalog import load_catalog
from rma.schemas.api import ServiceSpec


def need(program: str) -> None:
    if find_program(program) is None:
        pytest.skip(f"{program} is not installed (apt-get install postgresql redis-server)")


@contextlib.asynccontextmanager
async def running(
    rt: ProcessRuntime, spec: ServiceSpec, data_dir: Path
) -> AsyncIterator[tuple[Handle, int]]:
    port = free_port()
    handle = await rt.start(spec, port, data_dir)
    try:
        deadline = asyncio.get_running_loop().time() + 60
        while True:
            ok, seen = await probe_protocol(spec.health, "127.0.0.1", port)
            if ok:
                break
            ended = await rt.exit_status(handle)
            assert ended is None, f"{spec.name} {ended}: {rt.log_tail(handle)}"
            assert asyncio.get_running_loop().time() < deadline, seen
            await asyncio.sleep(0.1)
        yield handle, port
    finally:
        await rt.stop(spec.name, handle, grace=10)


async def test_postgres_starts_keeps_its_data_and_restores_into_a_fresh_cluster(
    tmp_path: Path,
) -> None:
    need("initdb")
    import psycopg

    spec = load_catalog()["postgres"]
    rt = ProcessRuntime(tmp_path / "agent")
    first, fresh = tmp_path / "first", tmp_path / "fresh"
    dump = tmp_path / "pg.sql"
    async with running(rt, spec, first) as (_, port):
        url = f"postgresql://postgres:rma@127.0.0.1:{port}/postgres"
        async with await psycopg.AsyncConnection.connect(url) as conn:
            await conn.execute("CREATE TABLE t (n int)")
            await conn.execute("INSERT INTO t SELECT generate_series(1, 500)")
            await conn.commit()
        with pytest.raises(psycopg.OperationalError, match="password"):
            await psycopg.AsyncConnection.connect(url.replace(":rma@", ":wrong@"))
        # the redis probe is not fooled by a PostgreSQL port, nor the reverse
        assert (await probe_protocol("redis", "127.0.0.1", port))[0] is False
        await backup.take(spec, port, first, dump)
    assert b"CREATE TABLE public.t" in dump.read_bytes()

    async with running(rt, spec, first) as (_, port):  # a restart keeps the cluster
        url = f"postgresql://postgres:rma@127.0.0.1:{port}/postgres"
        async with await psycopg.AsyncConnection.connect(url) as conn:
            cur = await conn.execute("SELECT count(*) FROM t")
            assert await cur.fetchone() == (500,)

    assert backup.needs_restore(fresh)
    async with running(rt, spec, fresh) as (_, port):
        await backup.restore_after_start(spec, port, dump)
        url = f"postgresql://postgres:rma@127.0.0.1:{port}/postgres"
        async with await psycopg.AsyncConnection.connect(url) as conn:
            cur = await conn.execute("SELECT count(*), sum(n) FROM t")
            assert await cur.fetchone() == (500, 125250)
    assert not backup.needs_restore(fresh)  # a second start here keeps its own data


async def test_redis_snapshot_is_loaded_by_a_fresh_copy(tmp_path: Path) -> None:
    need("redis-server")
    import redis.asyncio as aioredis

    spec = load_catalog()["redis"]
    rt = ProcessRuntime(tmp_path / "agent")
    first, fresh = tmp_path / "first", tmp_path / "fresh"
    snap = tmp_path / "dump.rdb"
    async with running(rt, spec, first) as (_, port):
        r = aioredis.Redis(port=port)
        await r.mset({f"k{i}": i for i in range(300)})
        await r.aclose()
        assert (await probe_protocol("postgres", "127.0.0.1", port))[0] is False
        await backup.take(spec, port, first, snap)
    assert snap.read_bytes().startswith(b"REDIS")

    backup.begin_restore(fresh, snap)
    backup.restore_before_start(spec, fresh, snap)
    async with running(rt, spec, fresh) as (_, port):
        r = aioredis.Redis(port=port)
        assert await r.dbsize() == 300
        assert await r.get("k299") == b"299"
        await r.aclose()


def test_a_broken_restore_starts_again_from_an_empty_folder(tmp_path: Path) -> None:
    folder = tmp_path / "svc"
    backup.begin_restore(folder, tmp_path / "restore" / "x.sql")
    (folder / "half-written").write_text("partial")
    assert backup.needs_restore(folder)  # the marker: wiped, restored again
    assert not folder.exists()
    folder.mkdir()
    (folder / "data").write_text("mine")
    assert not backup.needs_restore(folder)


async def test_probes_say_what_they_saw() -> None:
    closed = free_port()
    ok, seen = await probe_protocol("postgres", "127.0.0.1", closed)
    assert not ok and "ConnectionRefusedError" in seen

    async def http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(100)
        writer.write(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(http, "127.0.0.1", 0)
    port = int(server.sockets[0].getsockname()[1])
    try:
        ok, seen = await probe_protocol("redis", "127.0.0.1", port)
        assert not ok and "HTTP/1.1 400" in seen
        ok, seen = await probe_protocol("postgres", "127.0.0.1", port)
        assert not ok and "unexpected answer" in seen
    finally:
        server.close()
        await server.wait_closed()


def test_copies_no_longer_assigned_are_retired(tmp_path: Path) -> None:
    services = tmp_path / "services"
    for name in ("postgres", "redis", "ocr"):
        (services / name).mkdir(parents=True)
        (services / name / "data").write_text(name)
    backup.mark(services / "postgres")
    backup.mark(services / "redis")
    assert backup.retire_stale(services, keep={"redis"}) == ["postgres"]
    assert (services / ".retired" / "postgres" / "data").read_text() == "postgres"
    assert (services / "redis" / "data").exists()  # still assigned here
    assert (services / "ocr" / "data").exists()  # not a data service: never touched
    assert backup.needs_restore(services / "postgres")  # reassigned later: restore the newest
