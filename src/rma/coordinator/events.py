"""The event log: written to the database and fanned out live to followers (SSE)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

from sqlalchemy import Engine
from sqlmodel import Session, col, select

from rma.coordinator.clock import Clock
from rma.coordinator.db import session
from rma.coordinator.tables import Event
from rma.schemas.api import EventPublic


def to_public(row: Event) -> EventPublic:
    from datetime import UTC, datetime

    return EventPublic(
        id=row.id or 0,
        ts=datetime.fromtimestamp(row.ts, UTC),
        kind=row.kind,
        worker_id=row.worker_id,
        message=row.message,
        data=row.data,
    )


class EventBus:
    """``emit`` from any thread; ``subscribe`` from the event loop."""

    def __init__(self, engine: Engine, clock: Clock) -> None:
        self.engine = engine
        self.clock = clock
        self._subs: set[tuple[asyncio.AbstractEventLoop, asyncio.Queue[EventPublic]]] = set()
        self._lock = threading.Lock()
        #: Several coordinators: called with the event's id in the transaction that writes it,
        #: so the others show it to their followers too (``cluster``).
        self.announce: Callable[[Session, int], None] | None = None

    def emit(
        self,
        kind: str,
        message: str,
        worker_id: str | None = None,
        data: dict[str, Any] | None = None,
    ) -> EventPublic:
        row = Event(
            ts=self.clock.time(), kind=kind, worker_id=worker_id, message=message, data=data or {}
        )
        with session(self.engine) as s:
            s.add(row)
            s.flush()
            event = to_public(row)
            if self.announce is not None:
                self.announce(s, event.id)
        self.publish(event)
        return event

    def relay(self, event_id: int) -> None:
        """Another coordinator wrote this event: show it to this one's followers (blocking)."""
        with session(self.engine) as s:
            row = s.get(Event, event_id)
            event = to_public(row) if row is not None else None
        if event is not None:
            self.publish(event)

    def publish(self, event: EventPublic) -> None:
        with self._lock:
            subs = list(self._subs)
        for loop, queue in subs:
            try:
                loop.call_soon_threadsafe(_offer, queue, event)
            except RuntimeError:  # loop closed
                with self._lock:
                    self._subs.discard((loop, queue))

    def subscribe(self, maxsize: int = 1000) -> asyncio.Queue[EventPublic]:
        queue: asyncio.Queue[EventPublic] = asyncio.Queue(maxsize)
        with self._lock:
            self._subs.add((asyncio.get_running_loop(), queue))
        return queue

    def unsubscribe(self, queue: asyncio.Queue[EventPublic]) -> None:
        with self._lock:
            self._subs = {(lp, q) for lp, q in self._subs if q is not queue}

    def recent(self, limit: int = 100, since: int | None = None) -> list[EventPublic]:
        with session(self.engine) as s:
            query = select(Event)
            if since is not None:
                query = query.where(col(Event.id) > since).order_by(col(Event.id)).limit(limit)
                return [to_public(r) for r in s.exec(query)]
            rows = list(s.exec(query.order_by(col(Event.id).desc()).limit(limit)))
        return [to_public(r) for r in reversed(rows)]


class LiveFilter:
    """Which live events a follower has not had yet, given the backlog it was sent first.

    Ids are not live in order: an id is taken when the row is written and shown when its
    transaction commits, and another coordinator's event reaches this one's followers a notice
    later than this one's own.  So an event with a lower id than the last one shown may still be
    new; only one already in the backlog (the subscription began before the backlog was read)
    or already shown is a repeat.
    """

    def __init__(self, backlog: list[EventPublic], memory: int = 10_000) -> None:
        self._seen: dict[int, None] = dict.fromkeys(ev.id for ev in backlog)
        self._memory = memory

    def __call__(self, event: EventPublic) -> bool:
        if event.id in self._seen:
            return False
        self._seen[event.id] = None
        if len(self._seen) > self._memory:  # forget the oldest shown
            del self._seen[next(iter(self._seen))]
        return True


def _offer(queue: asyncio.Queue[EventPublic], event: EventPublic) -> None:
    if queue.full():  # a slow follower loses the oldest, never blocks the pool
        queue.get_nowait()
    queue.put_nowait(event)
