"""Usage records and credits are exact: every request of a burst is one usage row and one
ledger row, whether the periodic flush or the shutdown wrote it (the writer hands tuples to
the driver as they are: SQLite's ``?`` and PostgreSQL's named parameters alike)."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, func, select

from rma.coordinator.db import make_engine, migrate
from rma.coordinator.gateway.usage import UsageRecord, UsageRecorder
from rma.coordinator.tables import Credit, Usage

_USAGE = Usage.__table__  # type: ignore[attr-defined]
_CREDIT = Credit.__table__  # type: ignore[attr-defined]


def _engine(database_url: str, tmp_path: Path) -> Engine:
    if database_url.startswith("sqlite"):
        database_url = f"sqlite:///{tmp_path / 'usage.db'}"
    engine = make_engine(database_url)
    migrate(engine)
    return engine


def _rec(i: int) -> UsageRecord:
    return UsageRecord(
        ts=1_700_000_000.0 + i,
        key_id="k1" if i % 2 else None,
        service="fake",
        worker_id=f"w{i % 3}",
        status=200 if i % 7 else 502,
        latency_ms=i / 10,
        prompt_tokens=i % 5,
        completion_tokens=i % 11,
        attempts=1 + i % 2,
    )


def _sums(engine: Engine) -> tuple[int, int, int, int, float]:
    c = _USAGE.c
    stmt = select(
        func.count(),
        func.sum(c.prompt_tokens),
        func.sum(c.completion_tokens),
        func.sum(c.attempts),
        func.sum(c.latency_ms),
    )
    with engine.connect() as conn:
        n, p, comp, a, lat = conn.execute(stmt).one()
    return int(n), int(p or 0), int(comp or 0), int(a or 0), float(lat or 0.0)


def test_every_record_lands_while_flushes_run_alongside(database_url, tmp_path) -> None:
    engine = _engine(database_url, tmp_path)
    try:
        rec = UsageRecorder(engine)
        n = 5_000
        stop = threading.Event()

        def flusher() -> None:
            while not stop.is_set():
                rec.flush()

        t = threading.Thread(target=flusher)
        t.start()
        try:
            for i in range(n):
                rec.record(_rec(i))
                if i % 500 == 0:
                    time.sleep(0.001)  # let the flusher take a batch midway
        finally:
            stop.set()
            t.join()
        rec.flush()
        assert rec.written == n
        assert rec.dropped == 0
        expected = [_rec(i) for i in range(n)]
        count, prompt, completion, attempts, latency = _sums(engine)
        assert count == n
        assert prompt == sum(r.prompt_tokens for r in expected)
        assert completion == sum(r.completion_tokens for r in expected)
        assert attempts == sum(r.attempts for r in expected)
        assert abs(latency - sum(r.latency_ms for r in expected)) < 1e-3
        c = _USAGE.c
        with engine.connect() as conn:
            row = conn.execute(
                select(c.ts, c.key_id, c.service, c.worker_id, c.status, c.latency_ms)
                .add_columns(c.prompt_tokens, c.completion_tokens, c.attempts)
                .where(c.ts == 1_700_000_000.0 + 13)
            ).one()
        assert tuple(row) == tuple(_rec(13))  # every field in its own column
    finally:
        engine.dispose()


def test_a_full_buffer_counts_what_it_drops(database_url, tmp_path) -> None:
    engine = _engine(database_url, tmp_path)
    try:
        rec = UsageRecorder(engine, max_buffer=5)
        for i in range(8):
            rec.record(_rec(i))
        assert rec.dropped == 3
        assert rec.flush() == 5
        assert _sums(engine)[0] == 5
        with engine.connect() as conn:
            kept = sorted(conn.execute(select(_USAGE.c.ts)).scalars())
        assert kept == [1_700_000_000.0 + i for i in range(5)]  # the oldest were kept
        rec.record(_rec(8))  # room again
        assert rec.flush() == 1
        assert rec.dropped == 3
    finally:
        engine.dispose()


def _db_counts(pool: Any, database_url: str) -> tuple[int, int, int]:
    """(usage rows, their completion tokens, ledger earn+escrow rows) in the pool's database."""
    url = database_url
    if url.startswith("sqlite"):
        url = f"sqlite:///{pool.coord.data_dir / 'rma.db'}"
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            n, tokens = conn.execute(
                select(func.count(), func.sum(_USAGE.c.completion_tokens)).where(
                    _USAGE.c.service == "fake"
                )
            ).one()
            credits = conn.execute(
                select(func.count()).where(_CREDIT.c.kind.in_(("earn", "escrow")))
            ).scalar_one()
    finally:
        engine.dispose()
    return int(n), int(tokens or 0), int(credits)


def test_a_burst_is_all_in_the_database_after_a_sigterm(pool, backends, database_url) -> None:
    a = backends("a")
    pool.add_worker("wa", {"fake": a.url})
    body = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}
    n = 160

    with pool.client() as client:

        def one(_: int) -> int:
            return client.post("/v1/chat/completions", json=body).status_code

        with ThreadPoolExecutor(16) as ex:
            statuses = list(ex.map(one, range(n)))
    assert statuses == [200] * n
    # stopped at once: what the last periodic flush did not write, the shutdown writes
    pool.coord.stop()
    assert pool.coord.proc.returncode is not None
    usage, tokens, credits = _db_counts(pool, database_url)
    assert usage == n
    assert tokens == 3 * n  # the fake backend's usage object: 3 completion tokens
    assert credits == n  # one ledger row (earn or escrow) per successful request
