"""The common heartbeat (nothing changed but time, load and in-flight counts) is answered on
the event loop from memory: no thread, no SQL, credits from the ledger's in-memory balances;
any other heartbeat still takes :meth:`Pool.heartbeat` in a thread."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from sqlalchemy import event, insert

from rma.coordinator.clock import FakeClock
from rma.coordinator.tables import Credit

from .conftest import Api


def _svc(inflight: int = 0, healthy: bool = True) -> dict[str, Any]:
    return {"name": "ner", "state": "running", "healthy": healthy, "inflight": inflight}


def _poll(cond: Callable[[], bool], what: str, deadline: float = 20.0) -> None:
    end = time.monotonic() + deadline
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


@contextmanager
def statements(api: Api) -> Iterator[list[tuple[str, str]]]:
    """(thread name, statement) of every SQL statement the pool's engine runs meanwhile."""
    seen: list[tuple[str, str]] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        seen.append((threading.current_thread().name, statement.strip()))

    engine = api.pool.engine
    event.listen(engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", record)


def _ledger(api: Api) -> Any:
    ledger = api.app.state.gateway.ledger
    _poll(lambda: ledger._loaded, "the ledger's first read of the database")
    return ledger


class Calls:
    """Which threads ran a pool method (the real one still runs)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, pool: Any, name: str) -> None:
        self.threads: list[int] = []
        real = getattr(pool, name)

        def spy(*args: Any, **kwargs: Any) -> Any:
            self.threads.append(threading.get_ident())
            return real(*args, **kwargs)

        monkeypatch.setattr(pool, name, spy)


def test_a_plain_heartbeat_is_answered_on_the_loop_without_sql(
    api: Api, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    w = api.register("alpha", runnable=["ner"])
    api.heartbeat(w, services=[_svc()])  # a change (healthy now): the slow path writes it
    _ledger(api)
    clock.advance(30)
    with statements(api) as seen:
        body = api.heartbeat(w, load={"cpu_percent": 12.5}, services=[_svc(3)])
    # background loops (the batch, the ledger, the sweeper) run SQL in asyncio's threads;
    # nothing else may: not the loop itself nor a request thread
    assert [s for s in seen if not s[0].startswith("asyncio")] == [], seen
    loop_thread = api.client.portal.call(threading.get_ident)  # type: ignore[union-attr]
    quick = Calls(monkeypatch, api.pool, "quick_heartbeat")
    slow = Calls(monkeypatch, api.pool, "heartbeat")
    assert api.heartbeat(w, load={"cpu_percent": 12.5}, services=[_svc(3)]) == body
    assert quick.threads == [loop_thread]
    assert slow.threads == []
    assert body["status"] == "online"
    assert [a["name"] for a in body["assignments"]] == ["ner"]
    state = api.pool.registry.get(w.id)
    assert state.last_heartbeat_at == clock.now
    assert state.services["ner"].inflight == 3
    assert state.load.cpu_percent == 12.5
    assert api.pool.flush_heartbeats() == 1  # queued for the batch, as the slow path does


def test_a_heartbeat_that_changes_something_takes_the_thread(
    api: Api, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    w = api.register("alpha", runnable=["ner"])
    api.heartbeat(w, services=[_svc()])
    _ledger(api)
    loop_thread = api.client.portal.call(threading.get_ident)  # type: ignore[union-attr]
    slow = Calls(monkeypatch, api.pool, "heartbeat")
    clock.advance(5)
    body = api.heartbeat(w, services=[_svc(healthy=False)])  # health changed: written now
    assert len(slow.threads) == 1 and slow.threads[0] != loop_thread
    assert api.events("service")[-1]["data"]["healthy"] is False
    body = api.heartbeat(w, paused=True, pause_reason="gaming")  # a status change
    assert body["status"] == "paused"
    assert api.worker(w.id)["status"] == "paused"
    assert len(slow.threads) == 2
    body = api.heartbeat(w, services=[_svc(), {**_svc(), "name": "ocr"}])  # a claim
    assert len(slow.threads) == 3
    assert api.events("claim_refused")
    api.pool.restores[w.id] = {"ner": "b1"}  # a restore to send: once, from the slow path
    assert api.heartbeat(w, services=[_svc()])["restore"] == {"ner": "b1"}
    assert api.heartbeat(w, services=[_svc()])["restore"] == {}


def test_a_bad_credential_still_gets_the_slow_paths_errors(api: Api) -> None:
    w = api.register("alpha", runnable=["ner"])
    bad = w.credential[:-4] + ("AAAA" if not w.credential.endswith("AAAA") else "BBBB")
    r = api.client.post(
        "/api/worker/heartbeat", json={}, headers={"authorization": f"Bearer {bad}"}
    )
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_credential"
    r = api.client.post("/api/worker/heartbeat", json={}, headers=api.admin)
    assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
    r = api.client.post("/api/worker/heartbeat", json={"bogus": 1}, headers=w.headers)
    assert r.status_code == 422
    r = api.client.post("/api/worker/heartbeat", json={"bogus": 1})
    assert r.status_code == 401  # authentication before the body, as before


def test_the_credits_in_the_answer_follow_the_ledger(api: Api, clock: FakeClock) -> None:
    w = api.register("alpha", runnable=["ner"])
    api.heartbeat(w, services=[_svc()])
    ledger = _ledger(api)
    state = api.pool.registry.get(w.id)
    ledger.record(state, None, "ner", 2.0, 1.5)  # one request served, as the gateway records it
    ledger.flush()
    body = api.heartbeat(w, services=[_svc()])
    written = ledger.written_balance(w.id)
    assert sum(written) == pytest.approx(3.0)
    assert (body["credits"], body["escrow"]) == written
    # rows another coordinator wrote show once the ledger reads the balances again
    with api.pool.engine.begin() as conn:
        conn.execute(
            insert(Credit.__table__),  # type: ignore[attr-defined]
            [
                {
                    "ts": clock.now,
                    "kind": "earn",
                    "worker_id": w.id,
                    "key_id": None,
                    "service": "ner",
                    "amount": 4.25,
                }
            ],  # fmt: skip
        )
    ledger.refresh_owners()
    body = api.heartbeat(w, services=[_svc()])
    written = ledger.written_balance(w.id)
    assert sum(written) == pytest.approx(7.25)
    assert (body["credits"], body["escrow"]) == written
