"""The data tier for real: a real agent (tunnel transport, process runtime) runs the system's
PostgreSQL and Redis; clients reach them through ``rma connect`` (a real CLI process) with psycopg
and redis-py, several connections at once; and every wrong way in gets a clear refusal.

Skips (a failure under ``RMA_REQUIRE_ALL=1``) when initdb or redis-server is not installed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from test_agents import kill_machine

from rma.agent.programs import find_program

pytestmark = pytest.mark.slow


def data_catalog(*extra: str) -> str:
    """Only postgres and redis (and ``extra`` entries) may run on the test's workers."""
    from rma.catalog import load_catalog

    never = [
        f'[services.{name}]\nlabels = {{ rma_test_never = "1" }}\n'
        for name in load_catalog()
        if name not in ("postgres", "redis")
    ]
    return "\n".join([*never, *extra])


GHOST = """
[services.ghostdb]
description = "a TCP service nobody runs"
tier = 3
kind = "tcp"
labels = { rma_test_never = "1" }
connect_url = "ghost://{host}:{port}"
"""


def data_key(pool: Any, *services: str) -> str:
    """A client key that names ``services`` (a data service needs a key that names it)."""
    with pool.coord.admin() as c:
        r = c.post("/api/admin/keys", json={"name": "data", "services": list(services)})
        assert r.status_code == 201, r.text
        assert r.json()["services"] == sorted(services)
        return str(r.json()["key"])


def need(program: str) -> None:
    if find_program(program) is None:
        pytest.skip(f"{program} is not installed (apt-get install postgresql redis-server)")


def start_agent(
    pool: Any,
    tmp_path: Path,
    name: str,
    transport: str = "tunnel",
    env: dict[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    args = ["--coordinator", pool.url, "--token", pool.coord.token(), "--name", name]
    args += ["--transport", transport, "--runtime", "process", "--catalog", str(pool.catalog)]
    args += ["--data-dir", str(tmp_path / name)]
    with open(tmp_path / f"{name}.log", "ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "rma", "worker", "join", *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "RMA_HEARTBEAT_INTERVAL": "1", **(env or {})},
        )


def healthy(pool: Any, service: str) -> bool:
    with pool.coord.admin() as c:
        workers = c.get("/api/admin/workers").json()
    return any(
        s["name"] == service and s["healthy"]
        for w in workers
        if w["status"] == "online"
        for s in w["services"]
    )


class Connect:
    """A real ``rma connect SERVICE --json`` process and the connection string it printed."""

    def __init__(self, pool: Any, service: str, key: str, tmp_path: Path) -> None:
        self.log = tmp_path / f"connect-{service}.log"
        cmd = [sys.executable, "-m", "rma", "connect", service, "--json"]
        cmd += ["--coordinator", pool.url, "--api-key", key]
        with open(self.log, "ab") as err:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # the first line comes once it listens
        if not line:
            self.proc.wait(10)
            pytest.fail(f"rma connect {service} printed nothing: {self.log.read_text()}")
        self.info: dict[str, Any] = json.loads(line)
        self.url = str(self.info["url"])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def wait_for(what: str, cond: Any, timeout: float, logs: list[Path]) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            tails = {p.name: p.read_text()[-3000:] for p in logs if p.exists()}
            pytest.fail(f"{what} did not happen within {timeout:g} s: {tails}")
        time.sleep(0.3)


def postgres_rounds(url: str) -> None:
    import psycopg

    with psycopg.connect(url, connect_timeout=20) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS notes (id int PRIMARY KEY, body text)")
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO notes VALUES (%s, %s)", [(i, f"note {i}") for i in range(1000)]
            )
        conn.commit()

    def reader(n: int) -> tuple[int, str]:
        with psycopg.connect(url, connect_timeout=20) as c:
            count = c.execute("SELECT count(*) FROM notes").fetchone()
            body = c.execute("SELECT body FROM notes WHERE id = %s", (n,)).fetchone()
            assert count is not None and body is not None
            return int(count[0]), str(body[0])

    with ThreadPoolExecutor(4) as ex:  # four connections at once over the one tunnel
        results = list(ex.map(reader, [1, 250, 500, 999]))
    assert results == [(1000, "note 1"), (1000, "note 250"), (1000, "note 500"), (1000, "note 999")]
    with psycopg.connect(url) as conn:  # a large value both ways (many frames, credit windows)
        big = "x" * 3_000_000
        got = conn.execute("SELECT %s::text AS v", (big,)).fetchone()
        assert got is not None and got[0] == big


def redis_rounds(url: str) -> None:
    import redis

    clients = [redis.Redis.from_url(url, socket_timeout=20) for _ in range(3)]
    try:
        pipe = clients[0].pipeline()
        for i in range(1000):
            pipe.set(f"k{i}", f"v{i}")
        assert all(pipe.execute())

        def read(c: redis.Redis) -> list[Any]:
            return [c.get(f"k{i}") for i in (0, 500, 999)]

        with ThreadPoolExecutor(3) as ex:
            answers = list(ex.map(read, clients))
        assert answers == [[b"v0", b"v500", b"v999"]] * 3
        assert clients[1].dbsize() == 1000
    finally:
        for c in clients:
            c.close()


@pytest.mark.parametrize("transport", ["tunnel", "direct"])
def test_postgres_and_redis_through_rma_connect(pool_factory, tmp_path, transport) -> None:
    need("initdb")
    need("redis-server")
    env = {"RMA_HEARTBEAT_INTERVAL": "1", "RMA_CONNECT_MAX_PER_KEY": "6"}
    env["RMA_CONNECT_MAX_MESSAGE_BYTES"] = "65536"  # what rma connect sends at most
    pool = pool_factory(env=env, catalog_text=data_catalog())
    key = data_key(pool, "postgres", "redis")
    agent = start_agent(pool, tmp_path, "data-a", transport)
    connects: list[Connect] = []
    try:
        logs = [tmp_path / "data-a.log", tmp_path / "data-a" / "logs" / "postgres.log"]
        wait_for("postgres and redis healthy", lambda: healthy(pool, "postgres")
                 and healthy(pool, "redis"), 120, logs)  # fmt: skip

        pg = Connect(pool, "postgres", key, tmp_path)
        connects.append(pg)
        assert pg.info["worker"] == "data-a"
        assert pg.url.startswith("postgresql://postgres:rma@127.0.0.1:")
        postgres_rounds(pg.url)

        rd = Connect(pool, "redis", key, tmp_path)
        connects.append(rd)
        assert rd.url == f"redis://127.0.0.1:{rd.info['port']}"
        redis_rounds(rd.url)

        # the key's limit holds: 6 connections open, the 7th is refused with 429; text and
        # oversized messages close the connection with 1003 and 1009. The rounds above closed
        # their connections, but the coordinator releases each one only when its pump ends:
        # wait until none is counted, or a late release makes the 6th look like the 7th.
        wait_for("earlier connections released", lambda: data_connections(pool) == 0, 30, logs)
        asyncio.run(_limit_per_key(pool.url, key, 6))
        wait_for("the six released", lambda: data_connections(pool) == 0, 30, logs)
        asyncio.run(_message_rules(pool.url, key))

        # HTTP to a TCP service says how to reach it instead
        with pool.client() as c:
            r = c.get("/api/services/redis/anything")
        assert r.status_code == 400
        assert r.json()["error"]["code"] == "tcp_service"
        assert "rma connect redis" in r.json()["error"]["message"]

        with httpx.Client() as c:
            metrics = c.get(pool.url + "/metrics").text
        assert "rma_data_connections" in metrics
    finally:
        for conn in connects:
            conn.stop()
        kill_machine(agent)


def data_connections(pool: Any) -> float:
    """The coordinator's count of open data connections, from its /metrics."""
    with httpx.Client() as c:
        text = c.get(pool.url + "/metrics").text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("rma_data_connections{")
    )


async def _limit_per_key(url: str, key: str, limit: int) -> None:
    from websockets.asyncio.client import connect
    from websockets.exceptions import InvalidStatus

    ws_url = url.replace("http://", "ws://") + "/api/services/redis/connect"
    headers = {"Authorization": f"Bearer {key}"}
    async with contextlib.AsyncExitStack() as stack:
        socks = [
            await stack.enter_async_context(connect(ws_url, additional_headers=headers))
            for _ in range(limit)
        ]
        await socks[0].send(b"PING\r\n")  # the WebSocket is the raw stream: RESP comes back
        assert await asyncio.wait_for(socks[0].recv(), 20) == b"+PONG\r\n"
        with pytest.raises(InvalidStatus) as refused:
            async with connect(ws_url, additional_headers=headers):
                pass
        assert refused.value.response.status_code == 429
        body = json.loads(refused.value.response.body or b"{}")
        assert body["error"]["code"] == "too_many_connections"


async def _message_rules(url: str, key: str) -> None:
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed

    ws_url = url.replace("http://", "ws://") + "/api/services/redis/connect"
    headers = {"Authorization": f"Bearer {key}"}
    for message, code in (("PING\r\n", 1003), (b"x" * 70_000, 1009)):
        async with connect(ws_url, additional_headers=headers) as ws:
            await ws.send(message)
            with pytest.raises(ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), 20)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == code


def _refusal(url: str, service: str, key: str | None) -> tuple[int, dict[str, Any]]:
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    ws_url = url.replace("http://", "ws://") + f"/api/services/{service}/connect"
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        with connect(ws_url, additional_headers=headers, open_timeout=10):
            pass
    except InvalidStatus as exc:
        return exc.response.status_code, json.loads(exc.response.body or b"{}")
    pytest.fail(f"{service}: the connection was accepted")


def test_connect_refusals(pool_factory, tmp_path) -> None:
    pool = pool_factory(catalog_text=data_catalog(GHOST))
    url, key = pool.url, data_key(pool, "ghostdb")
    cases = {
        ("nosuch", key): (404, "unknown_service"),
        ("ocr", key): (400, "not_tcp_service"),
        ("ghostdb", key): (503, "no_worker"),
        ("ghostdb", pool.api_key): (403, "service_not_allowed"),  # names no data service
        ("ghostdb", data_key(pool, "redis")): (403, "service_not_allowed"),
        ("ghostdb", "rma_sk_not-a-real-key"): (401, "invalid_api_key"),
        ("ghostdb", None): (401, "missing_api_key"),
        ("ghostdb", pool.coord.admin_key): (403, "forbidden"),
    }
    for (service, secret), (status, code) in cases.items():
        got_status, body = _refusal(url, service, secret)
        assert (got_status, body["error"]["code"]) == (status, code), (service, body)
        assert body["error"]["message"]

    # the key's scope holds on HTTP services too, and a key cannot name an unknown service
    with pool.client(data_key(pool, "ghostdb")) as c:
        r = c.get("/api/services/ocr/health")
    assert r.status_code == 403 and r.json()["error"]["code"] == "service_not_allowed", r.text
    with pool.coord.admin() as c:
        before = c.get("/api/admin/keys").json()
        r = c.post("/api/admin/keys", json={"services": ["redis", "nosuch"]})
        assert r.status_code == 422 and "nosuch" in r.json()["error"]["message"], r.text
        assert c.get("/api/admin/keys").json() == before  # nothing was created

    # the CLI: one error line, exit 1, nothing listening
    for service, words in (("ghostdb", "no worker is running"), ("nosuch", "no service")):
        res = subprocess.run(
            [sys.executable, "-m", "rma", "connect", service, "--coordinator", url],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "RMA_API_KEY": key},
        )
        assert res.returncode == 1, res
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and words in lines[0], lines
        assert "Traceback" not in res.stderr
        assert res.stdout == ""
    res = subprocess.run(
        [sys.executable, "-m", "rma", "connect", "ghostdb", "--coordinator", url],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 1 and "needs a client API key" in res.stderr, res


def test_process_runtime_knows_what_is_missing(monkeypatch) -> None:
    """Without the programs, the process runtime says so (the agent does not offer the service)."""
    from rma.agent import programs
    from rma.agent.runtimes.process import ProcessRuntime
    from rma.catalog import load_catalog

    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setattr(programs, "SEARCH_GLOBS", ())
    programs.find_program.cache_clear()
    try:
        rt = ProcessRuntime(Path("/nonexistent"))
        cat = load_catalog()
        assert rt.unavailable(cat["postgres"]) == "initdb, postgres not installed on this machine"
        assert rt.unavailable(cat["redis"]) == "redis-server is not installed on this machine"
    finally:
        programs.find_program.cache_clear()
