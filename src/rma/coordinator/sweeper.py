"""Liveness: silent workers go offline, then are removed; unless the coordinator suspects itself.

The rules (times are settings):

- silent for ``offline_after`` -> ``offline`` (no new requests); a heartbeat brings it back;
- silent for ``remove_after`` -> ``removed`` (its credential stops working);
- silence is counted from the later of the last heartbeat and the coordinator's start, and nobody
  is judged during ``restart_grace`` after a start: workers get one window to find us again;
- when more than ``suspect_fraction`` of the watched workers went silent *at once* (their last
  heartbeats lie within one ``offline_after`` window of each other), the fault is more likely on
  the coordinator's side (its network, a stalled database): nobody is removed, and a ``suspect``
  event says so; a ``suspect_cleared`` event follows when that is over.  Workers are still
  marked offline meanwhile, so requests are not sent to them.  Silence is then counted from the
  end of the episode too: the workers that come back a little later than the majority (their
  next heartbeat is up to one interval away) are not removed for a silence that was ours.

Several coordinators on one PostgreSQL database: only the leader sweeps (``coordinator/cluster``);
before it judges a worker silent it reads that worker's last heartbeat from the database, since
another coordinator may have heard it.

Each sweep also checks claimed hardware: a GPU-tier worker whose GPU services did not become
healthy within ``gpu_verify_window`` loses them and is re-tiered (``Pool.check_gpu_claims``).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time

import anyio

from rma.coordinator.pool import Pool
from rma.coordinator.registry import WorkerState
from rma.schemas.enums import WorkerStatus

log = logging.getLogger("rma.coordinator.sweeper")

#: Heartbeating workers; a paused one heartbeats too (offline only when it falls silent).
LIVE = (WorkerStatus.ONLINE, WorkerStatus.DRAINING, WorkerStatus.PAUSED)
WATCHED = (*LIVE, WorkerStatus.OFFLINE)


class Sweeper:
    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.suspecting = False
        #: When the last suspect episode ended (the pool's clock); silence counts from there.
        self.cleared_at = 0.0

    def _last_seen(self, w: WorkerState) -> float:
        return max(w.last_heartbeat_at or 0.0, self.pool.started_at, self.cleared_at)

    def run_once(self) -> dict[str, list[str]]:
        """One sweep; returns the ids it marked ``offline`` and ``removed``."""
        pool, cfg = self.pool, self.pool.settings
        now = pool.clock.time()
        done: dict[str, list[str]] = {"offline": [], "removed": []}
        if not pool.cluster.is_leader:
            return done  # the leader judges (several coordinators)
        if now - pool.started_at < cfg.grace:
            return done  # just restarted: give every worker one window to reach us
        watched = [w for w in pool.registry.all() if w.status in WATCHED]
        silent = [w for w in watched if now - self._last_seen(w) >= cfg.offline_after]
        if silent and pool.cluster.shared:  # heard by another coordinator since?
            from rma.coordinator.cluster.changes import refresh_heartbeats

            refresh_heartbeats(pool, silent)
            silent = [
                w
                for w in silent
                if w.status in WATCHED and now - self._last_seen(w) >= cfg.offline_after
            ]
        for w in silent:
            if w.status in LIVE:
                quiet = now - self._last_seen(w)
                pool._set_status(
                    w,
                    WorkerStatus.OFFLINE,
                    "offline",
                    f"worker {w.name} is offline: no heartbeat for {quiet:.0f} s",
                    {"coordinator": pool.cluster.name},
                )
                done["offline"].append(w.id)
        pool.check_gpu_claims()
        if self._suspect(watched, silent):
            self._reconcile(now)
            return done
        for w in silent:
            quiet = now - self._last_seen(w)
            if quiet >= cfg.remove_after and w.status is WorkerStatus.OFFLINE:
                pool._set_status(
                    w,
                    WorkerStatus.REMOVED,
                    "removed",
                    f"worker {w.name} was removed: no heartbeat for {quiet:.0f} s",
                    {"coordinator": pool.cluster.name},
                )
                done["removed"].append(w.id)
        self._reconcile(now)
        return done

    def _reconcile(self, now: float) -> None:
        """The scheduler's periodic pass (drain hand-over deadlines, missed events)."""
        if self.pool.scheduler.due(now):
            self.pool.scheduler.run("periodic")

    def _suspect(self, watched: list[WorkerState], silent: list[WorkerState]) -> bool:
        """Whether most workers went silent at once (and say so once per episode)."""
        cfg = self.pool.settings
        together: list[WorkerState] = []
        if silent:
            newest = max(self._last_seen(w) for w in silent)
            together = [w for w in silent if newest - self._last_seen(w) <= cfg.offline_after]
        suspect = len(watched) >= 2 and len(together) / len(watched) > cfg.suspect_fraction
        if suspect and not self.suspecting:
            self.pool.events.emit(
                "suspect",
                f"{len(together)} of {len(watched)} workers went silent at once: the coordinator "
                "suspects its own network and removes nobody until they come back",
                data={"silent": len(together), "watched": len(watched)},
            )
        elif self.suspecting and not suspect:
            self.cleared_at = self.pool.clock.time()
            self.pool.events.emit(
                "suspect_cleared",
                "most workers are reachable again: the silent ones are judged again from now",
                data={"silent": len(together), "watched": len(watched)},
            )
        self.suspecting = suspect
        return suspect

    def prune(self) -> dict[str, int]:
        """Delete events and usage records past their retention; returns how many of each."""
        from sqlmodel import col, delete

        from rma.coordinator.db import session
        from rma.coordinator.tables import Event, Usage

        pool, cfg = self.pool, self.pool.settings
        now = pool.clock.time()
        with session(pool.engine) as s:
            events = s.exec(delete(Event).where(col(Event.ts) < now - cfg.event_retention))
            usage = s.exec(delete(Usage).where(col(Usage.ts) < now - cfg.usage_retention))
            return {"events": int(events.rowcount or 0), "usage": int(usage.rowcount or 0)}

    async def run(self) -> None:
        """Sweep forever (the app's lifespan task), with jitter; errors are logged, never fatal.

        Old events and usage records are pruned about once an hour.
        """
        interval = self.pool.settings.sweep_interval
        next_prune = 0.0
        while True:
            await asyncio.sleep(interval * random.uniform(0.8, 1.2))
            try:
                await anyio.to_thread.run_sync(self.run_once)
                if time.monotonic() >= next_prune and self.pool.cluster.is_leader:
                    next_prune = time.monotonic() + 3600
                    await anyio.to_thread.run_sync(self.prune)
            except Exception:
                log.exception("liveness sweep failed")
