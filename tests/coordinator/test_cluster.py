"""Two coordinators in-process on one PostgreSQL database: one leader, registries that follow.

Both apps share one :class:`FakeClock` (liveness is judged by the clock) but nothing else: their
own data dirs, engines, registries and cluster connections.  Needs ``RMA_TEST_DATABASE_URL``
(PostgreSQL); skips otherwise (a failure under ``RMA_REQUIRE_ALL=1``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text
from tests.conftest import TEST_DB_URL

from rma.coordinator.app import create_app
from rma.coordinator.clock import FakeClock
from rma.coordinator.credentials import write_secret_file
from rma.settings import CoordinatorSettings

from .conftest import Api

pytestmark = pytest.mark.skipif(
    not TEST_DB_URL or not TEST_DB_URL.startswith("postgres"),
    reason="several coordinators need PostgreSQL: set RMA_TEST_DATABASE_URL",
)


def wait_for(what: str, check: Callable[[], Any], timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


class Apps:
    """Start coordinators A, B, ... in-process on the test database; all stop at the end."""

    def __init__(self, tmp_path: Path, database_url: str, clock: FakeClock) -> None:
        self.tmp_path = tmp_path
        self.database_url = database_url
        self.clock = clock
        self.running: list[tuple[TestClient, Api]] = []
        self.admin_key: str | None = None

    def start(self, name: str, **settings: Any) -> Api:
        data_dir = self.tmp_path / name
        if self.admin_key is not None:  # the others find A's admin key in the database
            write_secret_file(data_dir / "admin.key", self.admin_key)
        cfg = CoordinatorSettings(
            data_dir=data_dir,
            database_url=self.database_url,
            coordinator_name=name,
            leader_retry_interval=0.2,
            **settings,
        )
        app = create_app(cfg, clock=self.clock, run_sweeper=False)
        client = TestClient(app)
        client.__enter__()
        key = (data_dir / "admin.key").read_text().strip()
        self.admin_key = self.admin_key or key
        api = Api(client, app, key)
        self.running.append((client, api))
        return api

    def stop(self, api: Api) -> None:
        for i, (client, running) in enumerate(self.running):
            if running is api:
                del self.running[i]
                client.__exit__(None, None, None)
                api.pool.engine.dispose()
                return

    def stop_all(self) -> None:
        while self.running:
            self.stop(self.running[-1][1])


@pytest.fixture
def apps(tmp_path: Path, database_url: str) -> Iterator[Apps]:
    started = Apps(tmp_path, database_url, FakeClock())
    try:
        yield started
    finally:
        started.stop_all()


def readyz(api: Api) -> dict[str, Any]:
    r = api.client.get("/readyz")
    assert r.status_code == 200, r.text
    return dict(r.json())


def test_one_leader_named_by_every_readyz_and_a_follower_takes_over(apps: Apps) -> None:
    a = apps.start("coord-a")
    b = apps.start("coord-b")
    assert readyz(a)["role"] == "leader"  # A started first: it took the lock
    wait_for("B to see A as the leader", lambda: readyz(b)["leader"] == "coord-a")
    assert readyz(b) == {
        "status": "ready",
        "coordinator": "coord-b",
        "leader": "coord-a",
        "role": "follower",
    }
    assert readyz(a)["leader"] == "coord-a"

    apps.stop(a)  # its cluster connection closes: PostgreSQL lets go of the lock
    wait_for("B to lead", lambda: readyz(b)["role"] == "leader", timeout=10)
    assert readyz(b)["leader"] == "coord-b"
    elected = b.events("leader_elected")
    assert [e["data"]["coordinator"] for e in elected] == ["coord-a", "coord-b"]


def test_a_registration_on_one_reaches_the_other_and_heartbeats_are_not_refused(
    apps: Apps,
) -> None:
    a = apps.start("coord-a")
    b = apps.start("coord-b")
    w = a.register("w1")
    seen = wait_for("B to know w1", lambda: b.pool.registry.get(w.id))
    assert seen.name == "w1" and seen.status.value == "online"
    assert [x["id"] for x in b.workers()] == [w.id]

    # A heartbeat reaching B before any notice did: looked up in the database, not refused.
    with b.pool.registry.lock:
        b.pool.registry._workers.pop(w.id)
    body = b.heartbeat(w, load={"cpu": 0.5})
    assert body["status"] == "online"
    assert b.pool.registry.get(w.id) is not None

    # A change made on B (a drain) reaches A.
    r = b.client.post(f"/api/admin/workers/{w.id}/drain", headers=b.admin)
    assert r.status_code == 200, r.text
    wait_for("A to see the drain", lambda: a.worker(w.id)["status"] == "draining")

    # Removed by the operator on A: B refuses the worker's credential, as A does.
    r = a.client.delete(f"/api/admin/workers/{w.id}", headers=a.admin)
    assert r.status_code == 200, r.text
    wait_for("B to see the removal", lambda: b.pool.registry.get(w.id).revoked)
    r = b.client.post("/api/worker/heartbeat", json={}, headers=w.headers)
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "removed"


def test_only_the_leader_sweeps_and_it_counts_heartbeats_heard_elsewhere(apps: Apps) -> None:
    a = apps.start("coord-a")
    b = apps.start("coord-b")
    cfg = a.pool.settings
    apps.clock.advance(cfg.grace + 1)  # past both coordinators' start-up grace
    quiet = b.register("quiet")
    busy = b.register("busy")
    wait_for("A to know both", lambda: a.pool.registry.get(busy.id) is not None)

    apps.clock.advance(cfg.offline_after - 5)
    b.heartbeat(busy, load={"cpu": 0.1})  # heard by B alone: no notice, only the row
    apps.clock.advance(10)

    assert b.app.state.sweeper.run_once() == {"offline": [], "removed": []}  # a follower
    # A's memory says busy is silent too, but the database holds B's heartbeat.
    assert a.app.state.sweeper.run_once() == {"offline": [quiet.id], "removed": []}
    assert a.pool.registry.get(busy.id).status.value == "online"
    wait_for("B to see quiet offline", lambda: b.worker(quiet.id)["status"] == "offline")
    offline = b.events("offline")
    assert [(e["worker_id"], e["data"]["coordinator"]) for e in offline] == [(quiet.id, "coord-a")]


def test_a_lost_connection_is_followed_by_a_full_resync(apps: Apps) -> None:
    a = apps.start("coord-a")
    b = apps.start("coord-b")
    w = a.register("w1")
    wait_for("B to know w1", lambda: b.pool.registry.get(w.id))
    before = b.pool.cluster.resyncs
    with a.pool.engine.begin() as conn:  # a change no notice announces (as if one was lost)
        conn.execute(text("UPDATE worker SET trusted = true WHERE id = :id"), {"id": w.id})
        conn.execute(
            text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE application_name = 'rma coord-b'"
            )
        )
    wait_for("B to reconnect and reload", lambda: b.pool.cluster.resyncs > before)
    assert b.pool.registry.get(w.id).trusted is True
    assert b.pool.cluster.connected


def test_a_key_revoked_on_one_is_refused_by_the_other_at_once(apps: Apps) -> None:
    a = apps.start("coord-a", key_refresh_interval=600)
    b = apps.start("coord-b", key_refresh_interval=600)
    r = a.client.post("/api/admin/keys", json={"name": "k"}, headers=a.admin)
    assert r.status_code == 201, r.text
    created = r.json()
    assert b.pool.credentials.lookup_key(created["key"]) is not None  # cached on B now
    r = a.client.delete(f"/api/admin/keys/{created['id']}", headers=a.admin)
    assert r.status_code == 200, r.text
    wait_for("B to drop the key", lambda: b.pool.credentials.check_key(created["key"]) is None)


def test_a_write_on_the_leader_does_not_turn_back_a_heartbeat_heard_elsewhere(
    apps: Apps,
) -> None:
    a = apps.start("coord-a")
    b = apps.start("coord-b")
    cfg = a.pool.settings
    apps.clock.advance(cfg.grace + 1)
    w = b.register("w1")
    wait_for("A to know w1", lambda: a.pool.registry.get(w.id) is not None)
    apps.clock.advance(cfg.offline_after - 5)
    b.heartbeat(w, load={"cpu": 0.1})  # the row has it; A's memory does not
    # A writes the worker's row from its memory (the operator trusts it there) ...
    r = a.client.post(f"/api/admin/workers/{w.id}/trust", headers=a.admin)
    assert r.status_code == 200, r.text
    apps.clock.advance(10)
    # ... without writing back its older heartbeat time: the leader does not judge w1 silent.
    assert a.app.state.sweeper.run_once() == {"offline": [], "removed": []}
    assert a.worker(w.id)["status"] == "online"


def test_the_live_event_stream_shows_the_other_coordinators_events(apps: Apps) -> None:
    import asyncio

    a = apps.start("coord-a")
    b = apps.start("coord-b")

    async def follow_b_while_a_registers() -> list[str]:
        queue = b.pool.events.subscribe()
        try:
            await asyncio.to_thread(a.register, "w1")  # on A: B's followers see it too
            seen: list[str] = []
            async with asyncio.timeout(10):
                while "joined" not in seen:
                    seen.append((await queue.get()).kind)
            return seen
        finally:
            b.pool.events.unsubscribe(queue)

    assert "joined" in asyncio.run(follow_b_while_a_registers())
