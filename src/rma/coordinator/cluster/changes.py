"""Change notices between coordinators: sent in the writing transaction, applied by the others.

A write that other coordinators must see (a registration, a status or assignment change, a
removal, an API key made or revoked) sends ``NOTIFY rma_changes, '<json>'`` in the same
transaction, so the notice goes out exactly when the write commits (and not at all when it rolls
back).  The payload names the kind of record and its id, never its content: the receiver reads
the row itself, so a notice can be lost or repeated without harm, and a full :func:`resync` after
a lost connection repairs whatever was missed.

Heartbeats that change nothing but the load and the time are not announced (one notice per
heartbeat per coordinator would cost more than it tells): the leader reads the last heartbeat
times of the workers it is about to judge from the database (:func:`refresh_heartbeats`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sqlalchemy import text
from sqlmodel import Session, col, select

from rma.coordinator.db import session
from rma.coordinator.registry import WorkerState
from rma.coordinator.tables import Worker

if TYPE_CHECKING:
    from rma.coordinator.pool import Pool

log = logging.getLogger("rma.coordinator.cluster")

#: The PostgreSQL channel every coordinator of a pool listens on.
CHANNEL = "rma_changes"
#: Notice kinds: a worker's row changed; the API keys (or the admin key) changed.
WORKER = "worker"
KEYS = "keys"
#: An event was recorded (the others show it to their live followers).
EVENT = "event"


@dataclass(frozen=True, slots=True)
class Notice:
    origin: str
    kind: str
    ident: str
    #: Anything else the kind carries (``tunnels``: the holder's address and the worker ids).
    data: dict[str, Any] = field(default_factory=dict)


def encode(origin: str, kind: str, ident: str, data: dict[str, Any] | None = None) -> str:
    doc: dict[str, Any] = {"o": origin, "k": kind, "id": ident}
    if data:
        doc["d"] = data
    return json.dumps(doc, separators=(",", ":"))


def decode(payload: str) -> Notice | None:
    """The notice in a payload, or ``None`` for one this version does not understand."""
    try:
        doc = json.loads(payload)
        data = doc.get("d") or {}
        if not isinstance(data, dict):
            return None
        return Notice(str(doc["o"]), str(doc["k"]), str(doc.get("id") or ""), data)
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def send(s: Session, origin: str, kind: str, ident: str = "") -> None:
    """Queue a notice in ``s``'s transaction: PostgreSQL delivers it when that commits."""
    s.execute(
        text("SELECT pg_notify(:channel, :payload)"),
        {"channel": CHANNEL, "payload": encode(origin, kind, ident)},
    )


def reload_worker(pool: Pool, worker_id: str) -> WorkerState | None:
    """Read one worker's row and bring this coordinator's routing table to it.

    The row is read under the registry's lock, so a heartbeat this coordinator is handling for
    the same worker either lands before (and the row has it) or after (and wins).
    """
    with pool.registry.lock:
        with session(pool.engine) as s:
            row = s.get(Worker, worker_id)
        if row is None:
            return None
        state = pool.registry.get(worker_id)
        if state is None:
            state = WorkerState.from_row(row)
            pool.registry.put(state)
            pool._watch_gpu(state, pool.clock.time())  # its GPU claim, judged by the leader
        else:
            state.refresh_from(row)
    pool._notify(state)  # the gateway's hooks: a removed worker's tunnel is closed, ...
    return state


def resync(pool: Pool) -> int:
    """Reload every worker from the database (after a lost connection, on becoming leader).

    Returns how many rows were read.
    """
    with pool.registry.lock:
        with session(pool.engine) as s:
            rows = list(s.exec(select(Worker)).all())
        changed = [_take(pool, row) for row in rows]
    for state in changed:
        if state is not None:
            pool._notify(state)
    return len(rows)


def _take(pool: Pool, row: Worker) -> WorkerState | None:
    """Apply one row (under the registry's lock); the state if anything a hook sees changed."""
    state = pool.registry.get(row.id)
    if state is None:
        state = WorkerState.from_row(row)
        pool.registry.put(state)
        return state
    before = (state.status, state.quarantined, tuple(state.assignments), state.revoked)
    state.refresh_from(row)
    after = (state.status, state.quarantined, tuple(state.assignments), state.revoked)
    return state if after != before else None


def refresh_heartbeats(pool: Pool, states: Iterable[WorkerState]) -> None:
    """Bring these workers up to their rows when the row holds a later heartbeat: another
    coordinator may have heard them since this one last did (the leader calls it before it
    judges anyone silent)."""
    by_id = {w.id: w for w in states}
    if not by_id:
        return
    fresh: list[WorkerState] = []
    with pool.registry.lock:
        with session(pool.engine) as s:
            rows = s.exec(select(Worker).where(col(Worker.id).in_(list(by_id)))).all()
        for row in rows:
            w = by_id[row.id]
            if row.last_heartbeat_at is not None and (w.last_heartbeat_at or 0.0) < (
                row.last_heartbeat_at
            ):
                before = w.status
                w.refresh_from(row)
                if w.status is not before:
                    fresh.append(w)
    for w in fresh:
        pool._notify(w)
