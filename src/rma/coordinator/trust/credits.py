"""The credits ledger: what donors gave, in one unit across services.

Every successful request (status < 400) through the gateway credits the worker that served it
``seconds x credit_weight`` (the catalog's weight for the service: a GPU second is worth more
than a CPU second) and debits the client key that asked the same amount.  A worker that is not
established yet (fewer than ``credit_escrow_results`` agreeing verified results, not trusted)
earns into **escrow**; once it is established its escrow is released to its credits, and when
it is quarantined its escrow is forfeited.  The ledger is append-only (``credit`` table): rows
``earn``, ``escrow``, ``release``, ``forfeit``; balances are sums.

The request path only appends to a buffer; the usage flush loop's sibling writes it.

Each worker's balance is also kept in memory (:meth:`Ledger.cached_balance`, the heartbeat
answer's ``credits`` and ``escrow``): read from the database by the first flush, moved by every
batch this coordinator writes (once it is written, as a database read would see it), and read
again with the owners' credits every ``OWNERS_EVERY`` seconds, so rows another coordinator wrote
show within that.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy import Engine, func, insert, select

from rma.coordinator.registry import WorkerState
from rma.coordinator.tables import ApiKey, Credit
from rma.settings import CoordinatorSettings

log = logging.getLogger("rma.credits")

By = Literal["worker", "owner", "key"]
_KINDS = ("earn", "escrow", "release", "forfeit")
_TABLE = Credit.__table__  # type: ignore[attr-defined]
_KEYS = ApiKey.__table__  # type: ignore[attr-defined]


@dataclass(slots=True)
class _Row:
    ts: float
    kind: str
    worker_id: str | None
    key_id: str | None
    service: str
    amount: float


def _row_dict(r: _Row) -> dict[str, Any]:
    return {"ts": r.ts, "kind": r.kind, "worker_id": r.worker_id, "key_id": r.key_id,
            "service": r.service, "amount": r.amount}  # fmt: skip


def _balance(sums: list[float]) -> tuple[float, float]:
    """``(credits, escrow)`` from the sums of earn, escrow, release and forfeit rows."""
    earn, escrow, release, forfeit = sums
    return round(earn + release, 6), round(max(escrow - release - forfeit, 0.0), 6)


def owner_of(worker: WorkerState) -> str:
    """A worker's owner: ``rma worker join --owner NAME`` (``RMA_OWNER``), else its ``owner``
    label (``--label owner=NAME``)."""
    return worker.owner or worker.labels.get("owner", "")


def priority(credits: float) -> float:
    """A queued request's starting priority: ``log1p(the key owner's credits)``, 0 for a key
    without an owner (or an owner who gave nothing).  The balancer adds
    ``queue_priority_aging`` per second waited, so nobody starves."""
    return math.log1p(max(credits, 0.0))


#: Seconds between two readings of the owners' credits (for queue priority).
OWNERS_EVERY = 5.0


class Ledger:
    def __init__(
        self,
        engine: Engine,
        settings: CoordinatorSettings,
        workers: Callable[[], list[WorkerState]] = list,
    ) -> None:
        self.engine = engine
        self.settings = settings
        self.workers = workers
        #: owner -> credits, read in the flush loop (the request path reads only this)
        self.owners: dict[str, float] = {}
        self._buffer: deque[_Row] = deque()
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        #: worker id -> escrow balance: what the database held at start (read by the first
        #: flush, in a thread: the request path never reads the database) plus what came since
        self._escrow: dict[str, float] = {}
        self._loaded = False
        #: worker id -> sums of its written rows per kind (earn, escrow, release, forfeit):
        #: what the heartbeat answers from; ``None`` until the first read of the database
        self._written: dict[str, list[float]] | None = None

    # --- writing ----------------------------------------------------------------------------------

    def established(self, worker: WorkerState) -> bool:
        need = self.settings.credit_escrow_results
        agreed = worker.verified - worker.disagreements
        return not worker.quarantined and (worker.trusted or need == 0 or agreed >= need)

    def record(
        self, worker: WorkerState, key_id: str | None, service: str, seconds: float, weight: float
    ) -> None:
        """One successful request (cheap: the request path calls it)."""
        amount = round(max(seconds, 0.0) * weight, 6)
        now = time.time()
        with self._lock:
            escrow = self._balances()
            if self.established(worker):
                held = escrow.pop(worker.id, 0.0)
                if held > 0:
                    self._buffer.append(_Row(now, "release", worker.id, None, "", held))
                self._buffer.append(_Row(now, "earn", worker.id, key_id, service, amount))
            else:
                self._buffer.append(_Row(now, "escrow", worker.id, key_id, service, amount))
                if worker.quarantined:  # answered while being quarantined: lost at once
                    self._buffer.append(_Row(now, "forfeit", worker.id, None, "", amount))
                else:
                    escrow[worker.id] = escrow.get(worker.id, 0.0) + amount

    def on_worker_change(self, worker: WorkerState) -> None:
        """The pool's status hook: a quarantine forfeits the worker's escrow."""
        if not worker.quarantined:
            return
        with self._lock:
            held = self._balances().pop(worker.id, 0.0)
            if held > 0:
                self._buffer.append(_Row(time.time(), "forfeit", worker.id, None, "", held))

    def _balances(self) -> dict[str, float]:
        return self._escrow  # under self._lock

    def _load(self) -> None:
        """Add the escrow the database holds (before this coordinator wrote anything)."""
        if self._loaded:
            return
        rows = self._sums("worker_id")
        with self._lock:
            for row in rows:
                held = row["escrow"] - row["release"] - row["forfeit"]
                if row["id"] is not None and held > 1e-9:
                    self._escrow[row["id"]] = self._escrow.get(row["id"], 0.0) + held
            self._loaded = True
        self._set_written(rows)

    def _set_written(self, rows: list[dict[str, Any]]) -> None:
        """The in-memory balances from a read of the sums (under ``_flush_lock``: no batch of
        ours is written between the read and this)."""
        self._written = {r["id"]: [r[k] for k in _KINDS] for r in rows if r["id"] is not None}

    def _add_written(self, batch: list[dict[str, Any]]) -> None:
        written = self._written
        if written is None:
            return
        for r in batch:
            if r["worker_id"] is not None:
                sums = written.setdefault(r["worker_id"], [0.0] * len(_KINDS))
                sums[_KINDS.index(r["kind"])] += r["amount"]

    def flush(self) -> int:
        """Write what is buffered (blocking: call from a thread)."""
        with self._flush_lock:
            self._load()
            return self._write()

    def _write(self) -> int:
        with self._lock:  # only the swap under the lock the request path takes
            rows, self._buffer = self._buffer, deque()
        batch = [_row_dict(r) for r in rows]  # not asdict: it deep-copies every value
        if not batch:
            return 0
        try:
            with self.engine.begin() as conn:
                conn.execute(insert(_TABLE), batch)
        except Exception:
            log.exception("could not write %d credit rows; they are dropped", len(batch))
            return 0
        self._add_written(batch)
        return len(batch)

    def priority_of(self, owner: str) -> float:
        """The queue priority of a key of ``owner`` (cheap: the request path calls it)."""
        return priority(self.owners.get(owner, 0.0)) if owner else 0.0

    def refresh_owners(self) -> None:
        """Re-read the owners' credits and the workers' balances (blocking: a thread)."""
        with self._flush_lock:  # no batch of ours lands between the read and the swap
            rows = self._sums("worker_id")
            if self._loaded:
                self._set_written(rows)
        self.owners = self._owner_sums(self.workers(), rows)

    async def run(self, interval: float = 1.0) -> None:
        await asyncio.to_thread(self.flush)
        await asyncio.to_thread(self.refresh_owners)
        loop = asyncio.get_running_loop()
        read_at = loop.time()
        while True:
            await asyncio.sleep(interval)
            if self._buffer:
                await asyncio.to_thread(self.flush)
            if loop.time() - read_at >= OWNERS_EVERY:
                read_at = loop.time()
                await asyncio.to_thread(self.refresh_owners)

    async def close(self) -> None:
        await asyncio.to_thread(self.flush)

    # --- reading ----------------------------------------------------------------------------------

    def _sums(self, column: str, since: float | None = None) -> list[dict[str, Any]]:
        t = _TABLE.c
        kinds = ("earn", "escrow", "release", "forfeit")
        stmt = select(t[column], t.kind, func.sum(t.amount), func.count()).group_by(
            t[column], t.kind
        )
        if since is not None:
            stmt = stmt.where(t.ts >= since)
        out: dict[Any, dict[str, Any]] = {}
        with self.engine.connect() as conn:
            for ident, kind, total, n in conn.execute(stmt):
                row = out.setdefault(
                    ident, {"id": ident, "requests": 0, **dict.fromkeys(kinds, 0.0)}
                )
                row[kind] = float(total or 0.0)
                if kind in ("earn", "escrow"):
                    row["requests"] += int(n)
        return list(out.values())

    def cached_balance(self, worker_id: str) -> tuple[float, float] | None:
        """``(credits, escrow)`` of one worker from memory (cheap, never the database);
        ``None`` before the first read of the database."""
        written = self._written
        if written is None:
            return None
        return _balance(written.get(worker_id, [0.0] * len(_KINDS)))

    def worker_balance(self, worker_id: str) -> tuple[float, float]:
        """``(credits, escrow)`` of one worker, as written: from memory once the database was
        read, else from the database (blocking)."""
        cached = self.cached_balance(worker_id)
        return cached if cached is not None else self.written_balance(worker_id)

    def written_balance(self, worker_id: str) -> tuple[float, float]:
        """``(credits, escrow)`` of one worker read from the database (blocking)."""
        t = _TABLE.c
        stmt = select(t.kind, func.sum(t.amount)).where(t.worker_id == worker_id).group_by(t.kind)
        sums = dict.fromkeys(("earn", "escrow", "release", "forfeit"), 0.0)
        with self.engine.connect() as conn:
            for kind, total in conn.execute(stmt):
                sums[kind] = float(total or 0.0)
        return _balance([sums[k] for k in _KINDS])

    def owner_credits(self, workers: list[WorkerState]) -> dict[str, float]:
        """owner -> credits (released, not escrow) of its workers (blocking: a thread)."""
        return self._owner_sums(workers, self._sums("worker_id"))

    @staticmethod
    def _owner_sums(workers: list[WorkerState], rows: list[dict[str, Any]]) -> dict[str, float]:
        known = {w.id: owner_of(w) for w in workers}
        out: dict[str, float] = {}
        for r in rows:
            owner = known.get(r["id"], "")
            if owner:
                out[owner] = out.get(owner, 0.0) + r["earn"] + r["release"]
        return out

    def balances(
        self, by: By, workers: list[WorkerState], since: float | None = None
    ) -> list[dict[str, Any]]:
        """``[{id, name, owner, credits, escrow, requests}]`` (flushes first).

        ``since`` (a Unix time): only the rows written since then, so ``credits`` is what was
        earned or released in that window, ``escrow`` what went into escrow in it and was not
        released or forfeited in it (never below 0), ``requests`` the requests served in it.
        """
        self.flush()
        if by == "key":
            names = self._key_names()
            return [
                {
                    "id": r["id"],
                    "name": names.get(r["id"], "") if r["id"] else "(anonymous)",
                    "owner": "",
                    "credits": -round(r["earn"] + r["escrow"], 6),
                    "escrow": 0.0,
                    "requests": r["requests"],
                }
                for r in self._sums("key_id", since)
                if r["requests"]  # release and forfeit rows name no key
            ]
        known = {w.id: w for w in workers}
        rows = []
        for r in self._sums("worker_id", since):
            w = known.get(r["id"])
            rows.append(
                {
                    "id": r["id"],
                    "name": w.name if w else "",
                    "owner": owner_of(w) if w else "",
                    "credits": round(r["earn"] + r["release"], 6),
                    "escrow": round(max(r["escrow"] - r["release"] - r["forfeit"], 0.0), 6),
                    "requests": r["requests"],
                }
            )
        if by == "worker":
            return rows
        owners: dict[str, dict[str, Any]] = {}
        for row in rows:
            o = row["owner"]
            agg = owners.setdefault(
                o, {"id": o, "name": o or "(no owner)", "owner": o, "credits": 0.0,
                    "escrow": 0.0, "requests": 0},
            )  # fmt: skip
            agg["credits"] = round(agg["credits"] + row["credits"], 6)
            agg["escrow"] = round(agg["escrow"] + row["escrow"], 6)
            agg["requests"] += row["requests"]
        return list(owners.values())

    def _key_names(self) -> dict[str, str]:
        with self.engine.connect() as conn:
            keys = _KEYS.c
            return {k: n for k, n in conn.execute(select(keys.id, keys.name))}
