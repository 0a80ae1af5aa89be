"""Liveness: silent workers go offline, then are removed; unless the coordinator suspects itself."""

from __future__ import annotations

import asyncio
import logging
import random

import anyio

from rma.coordinator.pool import Pool
from rma.schemas.enums import WorkerStatus

log = logging.getLogger("rma.coordinator.sweeper")

LIVE = (WorkerStatus.ONLINE, WorkerStatus.DRAINING)


class Sweeper:
    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.suspecting = False

    def run_once(self) -> dict[str, list[str]]:
        """One sweep; returns the ids it marked ``offline`` and ``removed``."""
        pool, cfg = self.pool, self.pool.settings
        now = pool.clock.time()
        done: dict[str, list[str]] = {"offline": [], "removed": []}
        if now - pool.started_at < cfg.grace:
            return done  # just restarted: give every worker one window to reach us
        watched = [w for w in pool.registry.all() if w.status in (*LIVE, WorkerStatus.OFFLINE)]

        def silence(w_last: float | None) -> float:
            return now - max(w_last or 0.0, pool.started_at)

        silent = [w for w in watched if silence(w.last_heartbeat_at) >= cfg.offline_after]
        for w in silent:
            if w.status in LIVE:
                pool._set_status(
                    w,
                    WorkerStatus.OFFLINE,
                    "offline",
                    f"worker {w.name} is offline: no heartbeat for {silence(w.last_heartbeat_at):.0f} s",
                )
                done["offline"].append(w.id)
        suspect = len(watched) >= 2 and len(silent) / len(watched) > cfg.suspect_fraction
        if suspect:
            if not self.suspecting:
                pool.events.emit(
                    "suspect",
                    f"{len(silent)} of {len(watched)} workers went silent at once: the coordinator "
                    "suspects its own network and removes nobody until they come back",
                    data={"silent": len(silent), "watched": len(watched)},
                )
            self.suspecting = True
            return done
        self.suspecting = False
        for w in silent:
            if (
                silence(w.last_heartbeat_at) >= cfg.remove_after
                and w.status is WorkerStatus.OFFLINE
            ):
                pool._set_status(
                    w,
                    WorkerStatus.REMOVED,
                    "removed",
                    f"worker {w.name} was removed: no heartbeat for {silence(w.last_heartbeat_at):.0f} s",
                )
                done["removed"].append(w.id)
        return done

    async def run(self) -> None:
        """Sweep forever (the app's lifespan task), with jitter; errors are logged, never fatal."""
        interval = self.pool.settings.sweep_interval
        while True:
            await asyncio.sleep(interval * random.uniform(0.8, 1.2))
            try:
                await anyio.to_thread.run_sync(self.run_once)
            except Exception:
                log.exception("liveness sweep failed")
