"""Several coordinators over one database, with and without Redis.

Real ``rma coordinator serve`` processes on one database (SQLite file here, PostgreSQL in CI via
``database_url``), a real ``redis-server`` on a free loopback port, the ``openai`` SDK as the
client.  No worker runs: a request that passes authentication and the rate limit ends in 404
(no such model) — which is what tells a passed request from a limited one (429).
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from sqlalchemy import event

from rma.coordinator.credentials import write_secret_file
from rma.coordinator.pool import Pool
from rma.settings import CoordinatorSettings

from .conftest import Api, free_port, start_coordinator

# --- helpers ----------------------------------------------------------------------------------


@dataclass
class RedisServer:
    """A real ``redis-server`` on a free loopback port, no persistence."""

    port: int
    workdir: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        exe = shutil.which("redis-server")
        assert exe
        args = [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        args += ["--appendonly", "no", "--dir", str(self.workdir)]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        import redis

        deadline = time.monotonic() + 10
        while True:
            try:
                with redis.Redis(port=self.port, socket_timeout=0.5) as r:
                    r.ping()
                return
            except redis.RedisError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.kill()
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.05)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is missing (apt-get install redis-server)")
    server = RedisServer(free_port(), tmp_path)
    server.start()
    yield server
    server.kill()


Pair = tuple[Any, Any]


@pytest.fixture
def pair(tmp_path: Path, database_url: str) -> Iterator[Callable[..., Pair]]:
    """Start coordinators A and B on one database; both stop at the end."""
    started: list[Any] = []

    def start(env: dict[str, str] | None = None, redis_url: str | None = None) -> Pair:
        extra = ["--redis-url", redis_url] if redis_url else []
        a = start_coordinator(tmp_path / "a", database_url=database_url, env=env, extra_args=extra)
        started.append(a)
        # B finds the admin key made by A in the database; give it A's key file too.
        write_secret_file(tmp_path / "b" / "admin.key", a.admin_key)
        b = start_coordinator(tmp_path / "b", database_url=database_url, env=env, extra_args=extra)
        started.append(b)
        return a, b

    yield start
    for coord in started:
        coord.stop()


def create_key(coord: Any, rpm: int | None = None) -> dict[str, Any]:
    with coord.admin() as c:
        r = c.post("/api/admin/keys", json={"name": "k", "rpm": rpm})
        assert r.status_code == 201, r.text
        return dict(r.json())


def revoke_key(coord: Any, key_id: str) -> None:
    with coord.admin() as c:
        r = c.delete(f"/api/admin/keys/{key_id}")
        assert r.status_code == 200, r.text


def sdk(coord: Any, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{coord.url}/v1", api_key=key, max_retries=0, timeout=10)


def key_works(coord: Any, key: str) -> bool:
    with sdk(coord, key) as client:
        try:
            client.models.list()
        except openai.AuthenticationError:
            return False
    return True


def chat(coord: Any, key: str) -> int:
    """One chat request; its HTTP status (404: passed the limit, no such model; 429: limited)."""
    with sdk(coord, key) as client:
        try:
            client.chat.completions.create(
                model="no-such-model", messages=[{"role": "user", "content": "hi"}]
            )
        except openai.APIStatusError as exc:
            status = exc.status_code
            retry = exc.response.headers.get("retry-after")
        else:
            return 200
    if status == 429:
        assert retry is not None
        assert int(retry) >= 1
    return status


def wait_until(check: Callable[[], bool], limit: float) -> float:
    """Seconds until ``check()`` held; fails after ``limit`` seconds."""
    start = time.monotonic()
    while not check():
        assert time.monotonic() - start < limit, f"not within {limit} s"
        time.sleep(0.05)
    return time.monotonic() - start


# --- one process, two caches over one database --------------------------------------------------


def test_unknown_keys_are_looked_up_once_and_misses_are_remembered(
    api: Api, settings: CoordinatorSettings
) -> None:
    """Coordinator "B" here is a second Pool on the same database; its key lookups are counted
    as the SQL statements its engine really runs."""
    b = Pool(settings.model_copy(update={"key_miss_ttl": 0.3}))
    b.bootstrap()
    b.credentials.miss_ttl = 0.3
    queries: list[str] = []

    @event.listens_for(b.engine, "before_cursor_execute")
    def count(*args: Any) -> None:
        if "api_key" in str(args[2]).lower():
            queries.append(args[2])

    try:
        created = api.client.post("/api/admin/keys", json={"name": "x"}, headers=api.admin).json()
        key = created["key"]
        assert b.credentials.check_key(key) is None  # memory only: not seen here yet
        assert not queries
        info = b.credentials.lookup_key(key)
        assert info is not None
        assert info.id == created["id"]
        assert len(queries) == 1
        assert b.credentials.lookup_key(key) == info  # cached: no second query
        assert b.credentials.check_key(key) == info
        assert len(queries) == 1

        garbage = f"rma_key_{created['id']}.wrong-secret"  # a real id, a wrong secret: no query
        assert b.credentials.lookup_key(garbage) is None
        unknown = "rma_key_000000000000.whatever"  # a well-formed id nobody has
        assert b.credentials.lookup_key(unknown) is None
        assert b.credentials.lookup_key(unknown) is None  # remembered as unknown
        assert len(queries) == 2
        time.sleep(0.35)
        assert b.credentials.lookup_key(unknown) is None  # forgotten after the TTL: asked again
        assert len(queries) == 3
        assert b.credentials.lookup_key("sk-not-ours") is None  # not a key's shape: never asked
        assert len(queries) == 3

        # Revoked through A: B keeps its cache until a reload, then refuses it for good.
        api.client.delete(f"/api/admin/keys/{created['id']}", headers=api.admin)
        assert b.credentials.check_key(key) == info
        b.credentials.refresh()
        assert b.credentials.lookup_key(key) is None
        assert b.credentials.check_key(key) is None
    finally:
        b.engine.dispose()


# --- real processes -------------------------------------------------------------------------------


def test_without_redis_keys_reach_every_coordinator_but_limits_do_not(
    pair: Callable[..., Pair],
) -> None:
    a, b = pair(env={"RMA_KEY_REFRESH_INTERVAL": "1"})
    created = create_key(a, rpm=3)
    key = created["key"]
    assert key_works(b, key)  # made on A, works on B
    assert key_works(a, key)

    # Each coordinator counts alone: 3 rpm each, 6 pass over the two.
    statuses = [chat(c, key) for c in (a, b, a, b, a, b, a, b)]
    assert statuses[:6] == [404] * 6, statuses
    assert statuses[6:] == [429, 429], statuses

    revoke_key(a, created["id"])
    assert not key_works(a, key)  # at once where it was revoked
    took = wait_until(lambda: not key_works(b, key), limit=5)  # within the reload on B
    assert took < 1 + 2
    r = httpx.get(f"{b.url}/readyz")
    assert r.status_code == 200
    assert r.json()["status"] == "ready"
    assert "redis" not in r.json()  # no Redis: nothing about it


def test_with_redis_limits_and_revocations_are_shared(
    redis_server: RedisServer, pair: Callable[..., Pair]
) -> None:
    # A reload every 10 minutes: whatever reaches B sooner came through a lookup or Redis.
    a, b = pair(env={"RMA_KEY_REFRESH_INTERVAL": "600"}, redis_url=redis_server.url)
    created = create_key(a, rpm=4)
    key = created["key"]
    assert key_works(b, key)  # looked up in the database on B's first sight of it

    statuses = [chat(c, key) for c in (a, b, b, a, b, a)]
    assert statuses == [404, 404, 404, 404, 429, 429], statuses  # 4 over both, not 4 each

    other = create_key(b, rpm=0)
    assert key_works(a, other["key"])
    revoke_key(b, other["id"])
    took = wait_until(lambda: not key_works(a, other["key"]), limit=2)
    assert took < 2  # Redis carried it; the reload would take 600 s

    for coord in (a, b):
        r = httpx.get(f"{coord.url}/readyz")
        assert r.status_code == 200
        assert (r.json()["status"], r.json()["redis"]) == ("ready", "ok")
        assert "rma_redis_up 1" in httpx.get(f"{coord.url}/metrics").text

    started = time.monotonic()
    b.stop()  # SIGTERM: the pub/sub listener must not hold the shutdown up
    assert b.proc.returncode in (0, -signal.SIGTERM)  # not -9: it ended by itself
    assert time.monotonic() - started < 5


def test_with_redis_failed_authentications_are_counted_together(
    redis_server: RedisServer, pair: Callable[..., Pair]
) -> None:
    env = {"RMA_AUTH_FAIL_LIMIT": "3", "RMA_AUTH_FAIL_WINDOW": "30"}
    a, b = pair(env=env, redis_url=redis_server.url)
    key = create_key(a)["key"]
    assert key_works(b, key)
    for bad in ("rma_key_nosuch.secret", "sk-garbage", "rma_key_other.x"):
        assert not key_works(a, bad)  # three failures, all on A

    def b_refuses() -> bool:
        with sdk(b, "rma_key_nosuch.again") as client:
            try:
                client.models.list()
            except openai.RateLimitError:
                return True
            except openai.AuthenticationError:
                return False
        return False

    wait_until(b_refuses, limit=2)  # B counts A's failures: the next bad key gets 429 at once
    assert key_works(b, key)  # a valid key never does


def test_redis_killed_mid_test_requests_are_still_served(
    redis_server: RedisServer, pair: Callable[..., Pair], database_url: str
) -> None:
    a, b = pair(env={"RMA_KEY_REFRESH_INTERVAL": "600"}, redis_url=redis_server.url)
    created = create_key(a, rpm=2)
    key = created["key"]
    doomed = create_key(a, rpm=0)
    assert key_works(b, key)
    assert key_works(b, doomed["key"])
    assert [chat(a, key), chat(b, key)] == [404, 404]  # the shared bucket is empty now

    redis_server.kill()
    assert key_works(a, key)
    assert key_works(b, key)
    # Fail open: each coordinator's own bucket (2 rpm, full) takes over.
    assert [chat(a, key), chat(a, key), chat(a, key)] == [404, 404, 429]
    assert [chat(b, key), chat(b, key), chat(b, key)] == [404, 404, 429]
    for coord in (a, b):
        r = httpx.get(f"{coord.url}/readyz")
        assert r.status_code == 200  # ready all the same
        assert r.json()["redis"].startswith("unreachable"), r.json()
    assert "Redis is unreachable" in (b.log.read_text() if b.log else "")

    # Revoked while Redis is away: on PostgreSQL the database's own notice carries it to B at
    # once; on SQLite B hears nothing now, and catches up once Redis is back.
    revoke_key(a, doomed["id"])
    assert not key_works(a, doomed["key"])
    if database_url.startswith("postgres"):
        wait_until(lambda: not key_works(b, doomed["key"]), limit=5)
    else:
        assert key_works(b, doomed["key"])
    redis_server.start()
    wait_until(lambda: not key_works(b, doomed["key"]), limit=15)
    wait_until(lambda: httpx.get(f"{b.url}/readyz").json().get("redis") == "ok", limit=15)
    assert key_works(b, key)


def test_a_bad_redis_url_is_one_clear_error(tmp_path: Path) -> None:
    import sys

    r = subprocess.run(
        [sys.executable, "-m", "rma", "coordinator", "serve", "--port", "0"]
        + ["--data-dir", str(tmp_path / "d"), "--redis-url", "http://127.0.0.1:1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1].startswith("error: invalid setting redis_url")
    assert "Traceback" not in r.stderr
