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


def _counting_plans(monkeypatch: Any) -> list[int]:
    """How many nodes each scheduler pass plans, from now on."""
    from rma.coordinator.scheduler import loop

    sizes: list[int] = []
    real = loop.plan

    def counting(catalog: Any, nodes: list[Any], **kw: Any) -> Any:
        sizes.append(len(nodes))
        return real(catalog, nodes, **kw)

    monkeypatch.setattr(loop, "plan", counting)
    return sizes


def test_a_join_that_can_change_no_placement_plans_nothing(api: Api, monkeypatch: Any) -> None:
    token = api.token(uses=None)
    holder = api.register("holder", token=token, runnable=["ner"])
    for i in range(20):  # they can run nothing: no service fits them
        api.register(f"idle-{i}", token=token, runnable=[])
    sizes = _counting_plans(monkeypatch)
    idle = api.register("idle-late", token=token, runnable=[])
    assert sizes == []  # no pass at all for a worker no service fits
    assert idle.body["assignments"] == []
    api.register("capable", token=token, runnable=["ocr"])
    # a pass, over the workers that matter only: the holder and the new one, not the 21 idle
    assert sizes == [2]
    assert [s["name"] for s in api.heartbeat(holder)["assignments"]] == ["ner"]


def test_the_periodic_pass_skips_workers_no_service_fits(api: Api, monkeypatch: Any) -> None:
    token = api.token(uses=None)
    api.register("holder", token=token, runnable=["ner"])
    for i in range(10):
        api.register(f"idle-{i}", token=token, runnable=[])
    sizes = _counting_plans(monkeypatch)
    api.pool.scheduler.run("periodic")
    assert sizes == [1]


def test_a_join_reads_only_its_own_service_key(api: Api, monkeypatch: Any) -> None:
    from rma.coordinator.credentials import Credentials

    token = api.token(uses=None)
    w = api.register("alpha", token=token)
    first = w.body["service_key"]
    for i in range(5):
        api.register(f"other-{i}", token=token)

    def every_key(self: Credentials) -> Any:
        raise AssertionError("a registration read every API key in the pool")

    monkeypatch.setattr(Credentials, "list_keys", every_key)
    again = api.register(
        "alpha", token=token, worker_id=w.id, worker_secret=w.secret
    )  # a re-join: the old key is revoked, a new one made
    assert again.body["service_key"] not in (None, first)
    monkeypatch.undo()
    mine = [
        k
        for k in api.client.get("/api/admin/keys", headers=api.admin).json()
        if k["name"] == f"worker services {w.id}"
    ]
    assert sorted(k["revoked"] for k in mine) == [False, True]
