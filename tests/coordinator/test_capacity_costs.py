"""What a heartbeat and a registration cost must not grow with the pool (bench/capacity.py has
the timings): a heartbeat that changes nothing writes nothing on the request, and a
registration does not read every API key or plan every worker when it cannot change the plan."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import event, update

from rma.coordinator.clock import FakeClock
from rma.coordinator.db import session
from rma.coordinator.tables import Worker

from .conftest import Api


@contextmanager
def statements(api: Api) -> Iterator[list[str]]:
    """Every SQL statement the pool's engine runs meanwhile."""
    seen: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        seen.append(statement.strip().split()[0].upper())

    engine = api.pool.engine
    event.listen(engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", record)


def _row(api: Api, worker_id: str) -> Worker:
    with session(api.pool.engine) as s:
        row = s.get(Worker, worker_id)
    assert row is not None
    return row


def _svc(inflight: int) -> dict[str, Any]:
    return {"name": "ner", "state": "running", "healthy": True, "inflight": inflight}


def test_a_plain_heartbeat_writes_nothing_on_the_request(api: Api, clock: FakeClock) -> None:
    w = api.register("alpha", runnable=["ner"])
    api.heartbeat(w, services=[_svc(0)])  # a change (the service is healthy): written now
    assert _row(api, w.id).services[0]["healthy"] is True
    api.pool.flush_heartbeats()
    clock.advance(30)
    with statements(api) as seen:
        api.heartbeat(w, load={"cpu_percent": 12.5}, services=[_svc(2)])
    assert not [s for s in seen if s in ("INSERT", "UPDATE", "DELETE")], seen
    assert api.pool.registry.get(w.id).last_heartbeat_at == clock.now  # memory has it
    assert _row(api, w.id).last_heartbeat_at == clock.now - 30  # the row not yet
    assert api.pool.flush_heartbeats() == 1
    row = _row(api, w.id)
    assert row.last_heartbeat_at == clock.now
    assert row.load["cpu_percent"] == 12.5
    assert row.services[0]["inflight"] == 2
    assert api.pool.flush_heartbeats() == 0  # written once


def test_a_changed_heartbeat_is_still_written_at_once(api: Api, clock: FakeClock) -> None:
    w = api.register("alpha", runnable=["ner"])
    clock.advance(5)
    with statements(api) as seen:
        api.heartbeat(w, services=[_svc(0)])
    assert "UPDATE" in seen
    assert _row(api, w.id).last_heartbeat_at == clock.now
    assert api.pool.flush_heartbeats() == 0


def test_a_batch_never_turns_back_a_later_heartbeat_in_the_row(api: Api, clock: FakeClock) -> None:
    w = api.register("alpha")
    clock.advance(10)
    api.heartbeat(w, load={"cpu_percent": 1.0})
    later = clock.now + 20  # another coordinator heard it since and wrote its row
    with api.pool.engine.begin() as conn:
        conn.execute(
            update(Worker).where(Worker.id == w.id).values(last_heartbeat_at=later)  # type: ignore[arg-type]
        )
    api.pool.flush_heartbeats()
    assert _row(api, w.id).last_heartbeat_at == later


def test_the_app_writes_the_batches_by_itself(api: Api, clock: FakeClock) -> None:
    w = api.register("alpha")
    clock.advance(10)
    api.heartbeat(w, load={"cpu_percent": 33.0})
    deadline = time.monotonic() + 15
    while _row(api, w.id).last_heartbeat_at != clock.now:
        assert time.monotonic() < deadline, "the heartbeat never reached the database"
        time.sleep(0.05)
    assert _row(api, w.id).load["cpu_percent"] == 33.0
