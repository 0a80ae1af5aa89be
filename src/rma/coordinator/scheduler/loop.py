"""The reconciliation loop: the one place that changes assignments.

:meth:`Scheduler.run` snapshots the registry into :class:`~.feasible.Node` values, asks
:func:`~.reconcile.plan` for the desired placement and applies the difference under the
registry's lock: each worker's ``assignments`` (saved) and the GPU indices and shares its
assignments carry (in memory; a restarted coordinator places them again the same way).
Workers learn their part from the next heartbeat answer.

It runs on every event that can change a placement (join, leave, offline, removal, drain,
undrain, a service's health changing, a catalog reload) and every ``reconcile_interval``
seconds (from the sweeper).  With several coordinators each runs the passes its own events
trigger (a join answered at once), while the periodic and scaling passes are the leader's alone.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from rma.coordinator.scheduler.feasible import Node, fits
from rma.coordinator.scheduler.reconcile import Change, Placement, Plan, plan
from rma.coordinator.scheduler.scale import Demand, Scaler, ScaleSettings, Step

if TYPE_CHECKING:
    from rma.coordinator.pool import Pool
    from rma.coordinator.registry import WorkerState

log = logging.getLogger("rma.coordinator.scheduler")


def node_of(w: WorkerState) -> Node:
    return Node(
        id=w.id,
        name=w.name,
        tier=w.tier,
        caps=w.capabilities,
        labels=w.labels,
        status=w.status,
        # quarantined (its answers were found wrong): its services move elsewhere, as on a drain
        drained=w.drained or w.quarantined,
        runnable=w.runnable,
        current={n: w.placements[n].gpus if n in w.placements else () for n in w.assignments},
        healthy=frozenset(n for n, s in w.services.items() if s.healthy),
        since=w.status_changed_at,
    )


class Scheduler:
    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.last: Plan = Plan()
        self.last_run = float("-inf")
        #: service -> how many more copies demand asks for (the scaler sets it).
        self.demand: dict[str, int] = {}
        self.on_change: list[Callable[[list[Change]], None]] = []
        #: service -> the last ``scaled_up`` / ``scaled_down`` event's message.
        self.last_scaling: dict[str, str] = {}
        #: worker id -> (what the answer depends on, whether any catalog service fits it)
        self._hostable: dict[str, tuple[tuple[int, ...], bool]] = {}
        cfg = pool.settings
        self.scaler = Scaler(
            ScaleSettings(
                up_utilization=cfg.scale_up_utilization,
                down_utilization=cfg.scale_down_utilization,
                up_window=cfg.scale_up_window,
                down_after=cfg.scale_down_after,
                cooldown=cfg.scale_cooldown,
                default_capacity=cfg.worker_capacity,
            )
        )

    def due(self, now: float) -> bool:
        return now - self.last_run >= self.pool.settings.reconcile_interval

    def could_host(self, w: WorkerState) -> bool:
        """Whether any catalog service fits this worker at all (remembered per worker until its
        capabilities, labels, tier or the catalog change)."""
        catalog = self.pool.catalog
        key = (id(w), id(w.capabilities), id(w.labels), id(w.runnable), w.tier, id(catalog))
        hit = self._hostable.get(w.id)
        if hit is not None and hit[0] == key:
            return hit[1]
        node = node_of(w)
        ok = any(fits(spec, node) for spec in catalog.values())
        self._hostable[w.id] = (key, ok)
        return ok

    def concerns(self, w: WorkerState) -> bool:
        """Whether a pass could change anything for or because of this worker.

        A worker that holds nothing and that no catalog service fits plays no part in
        :func:`~.reconcile.plan` (it is never a candidate nor counted in a wanted number), so a
        pass leaves the plan as it was: its joins and status changes need none, and passes skip
        it (registration and the periodic pass cost what the workers that matter cost).
        """
        return bool(w.assignments) or bool(w.placements) or self.could_host(w)

    def run_for(self, w: WorkerState, trigger: str, *, emit: bool = True) -> list[Change]:
        """A pass for a change to ``w`` (a join, a status change), when it could matter."""
        with self.pool.registry.lock:
            if not self.concerns(w):
                return []
            return self.run(trigger, emit=emit)

    def run(self, trigger: str, *, emit: bool = True) -> list[Change]:
        """One pass; returns the changes (and emits their events unless ``emit`` is false)."""
        pool = self.pool
        with pool.registry.lock:
            now = pool.clock.time()
            workers = [w for w in pool.registry.all() if self.concerns(w)]
            result = plan(
                pool.catalog,
                [node_of(w) for w in workers],
                now=now,
                drain_timeout=pool.settings.drain_timeout,
                demand=self.demand,
                hold=pool.handovers.waiting(now, pool.drains_here),
            )
            for w in workers:
                self._apply(w, result.placements.get(w.id, {}))
            self.last = result
            self.last_run = now
        if emit:
            self.emit(result.changes, trigger)
        return result.changes

    def scale(self, inflight: Mapping[str, int], queued: Mapping[str, int]) -> list[Step]:
        """One look at demand (the gateway's counters and the workers' reports): scaling steps
        are applied at once (a reconcile pass) and emitted as ``scaled_up`` / ``scaled_down``."""
        pool = self.pool
        now = pool.clock.time()
        healthy = pool.registry.healthy_counts()
        reported: dict[str, int] = {}
        for w in pool.registry.all():
            for name, st in w.services.items():
                if w.serves(name):
                    reported[name] = reported.get(name, 0) + st.inflight
        steps = []
        for spec in pool.catalog.values():
            demand = Demand(
                healthy=healthy.get(spec.name, 0),
                inflight=max(inflight.get(spec.name, 0), reported.get(spec.name, 0)),
                queued=queued.get(spec.name, 0),
            )
            step = self.scaler.observe(now, spec, demand)
            if step is not None:
                steps.append(step)
        self.demand = self.scaler.wanted()
        if not steps:
            return steps
        trigger = "; ".join(f"{s.kind} {s.service} to {s.wanted}" for s in steps)
        changes = self.run(trigger, emit=False)
        for s in steps:
            word = "up" if s.kind == "scaled_up" else "down"
            message = f"{s.service} scaled {word} to {s.wanted} replicas: {s.reason}"
            self.last_scaling[s.service] = message
            pool.events.emit(
                s.kind, message, data={"service": s.service, "wanted": s.wanted, "reason": s.reason}
            )
        self.emit(changes, trigger)
        return steps

    async def scale_forever(
        self, counts: Callable[[], tuple[dict[str, int], dict[str, int]]]
    ) -> None:
        """Look at demand every ``scale_interval`` seconds (a lifespan task of the gateway);
        ``counts`` reads the balancer's in-flight and queued counters on the event loop."""
        import anyio

        while True:
            await asyncio.sleep(self.pool.settings.scale_interval * random.uniform(0.9, 1.1))
            if not self.pool.cluster.is_leader:
                continue  # one scaler per pool: the leader's
            try:
                inflight, queued = counts()
                await anyio.to_thread.run_sync(self.scale, inflight, queued)
            except Exception:
                log.exception("scaling pass failed")

    def _apply(self, w: WorkerState, placed: dict[str, Placement]) -> None:
        names = [n for n in w.assignments if n in placed]
        names += sorted(n for n in placed if n not in names)
        w.placements = dict(placed)
        if names != w.assignments:
            w.assignments = names
            self.pool._save(w)

    def emit(self, changes: list[Change], trigger: str) -> None:
        for c in changes:
            word = "assigned to" if c.kind == "assigned" else "unassigned from"
            self.pool.events.emit(
                c.kind,
                f"{c.service} {word} {c.worker}: {c.reason} ({trigger})",
                c.worker_id,
                {"service": c.service, "reason": c.reason, "trigger": trigger},
            )
        if changes:
            for hook in list(self.on_change):
                hook(changes)
