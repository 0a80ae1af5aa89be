"""Usage records: buffered in memory on the request path, written in batches from a thread.

The request path only appends a tuple to a deque; a background task flushes it every
``interval`` seconds (and on shutdown) with one ``executemany`` of a statement compiled once, the
tuples handed to the database driver as they are: the writer thread holds the GIL for little
more than the driver's own work (no per-row dicts or SQLAlchemy parameter processing), so the
event loop is not kept waiting for it.  ``rma admin stats`` reads the table.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, NamedTuple

from sqlalchemy import Engine, Table, insert, select

from rma.coordinator.tables import Usage

log = logging.getLogger("rma.gateway")
_TABLE: Table = Usage.__table__  # type: ignore[attr-defined]

#: How far back ``rma admin stats`` looks, and how many rows it reads at most.
STATS_WINDOW_S = 24 * 3600
STATS_MAX_ROWS = 200_000

_PROMPT = re.compile(rb'"prompt_tokens"\s*:\s*(\d+)')
_COMPLETION = re.compile(rb'"completion_tokens"\s*:\s*(\d+)')


def tokens_in(tail: bytes) -> tuple[int, int]:
    """Prompt and completion tokens from the end of an OpenAI answer (its ``usage`` object)."""
    if b"_tokens" not in tail:
        return 0, 0
    p = _PROMPT.findall(tail)
    c = _COMPLETION.findall(tail)
    return (int(p[-1]) if p else 0), (int(c[-1]) if c else 0)


class UsageRecord(NamedTuple):
    """One gateway request (a tuple: cheap to make, not tracked by the garbage collector once
    it holds only numbers and strings, and written as it is)."""

    ts: float
    key_id: str | None
    service: str
    worker_id: str | None
    status: int
    latency_ms: float
    prompt_tokens: int = 0
    completion_tokens: int = 0
    attempts: int = 1


_FIELDS = list(UsageRecord._fields)
_IDENTITY = tuple(range(len(_FIELDS)))


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    values.sort()
    idx = min(len(values) - 1, max(0, math.ceil(q * len(values)) - 1))
    return round(values[idx], 1)


class UsageRecorder:
    def __init__(
        self,
        engine: Engine,
        *,
        interval: float = 1.0,
        max_buffer: int = 200_000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.engine = engine
        self.interval = interval
        self.clock = clock
        self.max_buffer = max_buffer
        self._buffer: deque[UsageRecord] = deque()
        self._flush_lock = threading.Lock()
        self.written = 0
        #: records not kept because the buffer was full (the database was away that long)
        self.dropped = 0
        self._dropped_said = 0
        compiled = insert(_TABLE).compile(dialect=engine.dialect, column_keys=_FIELDS)
        self._sql = str(compiled)
        order = compiled.positiontup if compiled.positional else None
        #: positions of the record's fields in the statement's parameters (``None``: by name)
        self._order: tuple[int, ...] | None = (
            tuple(_FIELDS.index(name) for name in order) if order is not None else None
        )

    def record(self, rec: UsageRecord) -> None:
        """Cheap and non-blocking: the request path calls this."""
        if len(self._buffer) >= self.max_buffer:
            self.dropped += 1  # the oldest stay: they are written first when the database is back
            return
        self._buffer.append(rec)

    def _params(self, batch: list[UsageRecord]) -> list[Any]:
        order = self._order
        if order is None:
            return [r._asdict() for r in batch]
        if order == _IDENTITY:
            return batch
        return [tuple(r[i] for i in order) for r in batch]

    def flush(self) -> int:
        """Write what is buffered (blocking: call from a thread).  Returns the rows written."""
        with self._flush_lock:
            buffer = self._buffer
            batch: list[UsageRecord] = []
            while buffer:
                batch.append(buffer.popleft())
            if not batch:
                return 0
            try:
                with self.engine.begin() as conn:
                    conn.exec_driver_sql(self._sql, self._params(batch))
            except Exception:
                log.exception("could not write %d usage records; they are dropped", len(batch))
                return 0
            self.written += len(batch)
            if self.dropped > self._dropped_said:
                log.warning("%d usage records were dropped: the buffer was full", self.dropped)
                self._dropped_said = self.dropped
            return len(batch)

    async def run(self) -> None:
        import anyio

        while True:
            await asyncio.sleep(self.interval)
            if self._buffer:
                # anyio's thread call, unlike asyncio.to_thread, holds a cancellation until the
                # flush is done: no database write outlives the app's shutdown.
                await anyio.to_thread.run_sync(self.flush)

    async def close(self) -> None:
        import anyio

        await anyio.to_thread.run_sync(self.flush)

    def stats(self, worker_names: dict[str, str]) -> dict[str, Any]:
        """Per-service and per-worker requests, errors, tokens, p50/p95 (blocking)."""
        self.flush()
        since = self.clock() - STATS_WINDOW_S
        c = _TABLE.c
        stmt = (
            select(c.service, c.worker_id, c.status, c.latency_ms)
            .add_columns(c.prompt_tokens, c.completion_tokens)
            .where(c.ts >= since)
            .order_by(c.id.desc())
            .limit(STATS_MAX_ROWS)
        )
        with self.engine.connect() as conn:
            rows = conn.execute(stmt).all()
        by_service: dict[str, _Agg] = {}
        by_worker: dict[str, _Agg] = {}
        for service, worker_id, status, latency, p_tok, c_tok in rows:
            tokens = (p_tok or 0) + (c_tok or 0)
            by_service.setdefault(service, _Agg()).add(status, latency, tokens)
            if worker_id:
                name = worker_names.get(worker_id, worker_id)
                by_worker.setdefault(name, _Agg()).add(status, latency, tokens)
        services = [{"service": k, **v.summary()} for k, v in sorted(by_service.items())]
        workers = [{"worker": k, **v.summary()} for k, v in sorted(by_worker.items())]
        return {"usage": {"window_s": STATS_WINDOW_S, "by_service": services, "by_worker": workers}}


class _Agg:
    __slots__ = ("errors", "latencies", "requests", "tokens")

    def __init__(self) -> None:
        self.requests = 0
        self.errors = 0
        self.tokens = 0
        self.latencies: list[float] = []

    def add(self, status: int, latency: float, tokens: int) -> None:
        self.requests += 1
        self.errors += status >= 400
        self.tokens += tokens
        self.latencies.append(latency)

    def summary(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "errors": self.errors,
            "tokens": self.tokens,
            "p50_ms": _percentile(self.latencies, 0.50),
            "p95_ms": _percentile(self.latencies, 0.95),
        }
