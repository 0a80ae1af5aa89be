"""The routing table: every worker's state in memory, rebuilt from the database at start.

The request path reads only this; heartbeats and admin actions write it (from worker threads),
so compound updates hold a lock.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from rma.coordinator.scheduler.reconcile import Placement
from rma.coordinator.tables import Worker
from rma.schemas.api import Capabilities, Load, ServiceStatus, WorkerPublic
from rma.schemas.enums import Tier, Transport, WorkerStatus

#: Statuses whose workers still hold their assignments (count as replicas).  ``paused`` does
#: not: a paused donor runs nothing, so placement counts its services elsewhere.
HOLDING = (WorkerStatus.ONLINE, WorkerStatus.DRAINING, WorkerStatus.OFFLINE)


@dataclass(slots=True)
class WorkerState:
    id: str
    name: str
    status: WorkerStatus
    tier: int
    transport: Transport
    capabilities: Capabilities
    labels: dict[str, str]
    assignments: list[str]
    services: dict[str, ServiceStatus] = field(default_factory=dict)
    load: Load = field(default_factory=Load)
    endpoint: str | None = None
    trusted: bool = False
    version: str = ""
    registered_at: float = 0.0
    last_heartbeat_at: float | None = None
    status_changed_at: float = 0.0
    drained: bool = False
    #: The catalog services its runtime can start (from registration; ``None``: all that fit).
    runnable: frozenset[str] | None = None
    #: The scheduler's placement of each assignment (GPU indices, GPU share); in memory only.
    placements: dict[str, Placement] = field(default_factory=dict)
    #: Removed by the operator (``rma admin remove``): re-joining needs a new join token.  A
    #: worker the sweeper removed for its silence is ``removed`` but not revoked.
    revoked: bool = False
    #: A GPU-tier worker's GPU services must be healthy by then (seconds), or they are taken
    #: away and the worker re-tiered; ``None`` once one was (or for other tiers).  In memory.
    gpu_deadline: float | None = None
    #: Why the donor paused it (status ``paused``); in memory, refreshed by every heartbeat.
    pause_reason: str | None = None
    #: Reported services outside the assignments already announced (``claim_refused``), and
    #: those just unassigned, given one heartbeat to stop before they count as claims.
    claims: set[str] = field(default_factory=set)
    claim_grace: set[str] = field(default_factory=set)
    #: Verification (``coordinator/trust``): results compared, found wrong, consecutive
    #: agreements; a quarantined worker takes no client traffic but stays in the pool.
    verified: int = 0
    disagreements: int = 0
    verify_streak: int = 0
    quarantined: bool = False
    #: Who donates it (``rma worker join --owner``); see ``trust.credits.owner_of``.
    owner: str = ""
    #: The registry that indexes it by assignment (set by :meth:`Registry.put`).
    registry: Registry | None = field(default=None, repr=False, compare=False)

    def __setattr__(self, name: str, value: object) -> None:
        object.__setattr__(self, name, value)
        if name == "assignments":
            registry = getattr(self, "registry", None)  # unset while __init__ runs
            if registry is not None:
                registry.reindex(self)  # whoever changes the assignments, the index follows

    @property
    def reputation(self) -> float:
        """0..1: agreements among verified results, Laplace-smoothed (0.5 for a new worker)."""
        return (self.verified - self.disagreements + 1) / (self.verified + 2)

    def serves(self, service: str) -> bool:
        """Online, assigned this service by the coordinator, and reported it healthy.

        A service the worker reports but was not assigned (a *claim*) never takes traffic.
        """
        if (
            self.status is not WorkerStatus.ONLINE
            or self.quarantined
            or service not in self.assignments
        ):
            return False
        st = self.services.get(service)
        return st is not None and st.healthy

    def refused(self) -> list[str]:
        """Reported services the coordinator did not assign to this worker (claims refused)."""
        return sorted(n for n in self.services if n not in self.assignments)

    @classmethod
    def from_row(cls, row: Worker) -> WorkerState:
        state = cls._from_row(row)
        state.claims = set(state.refused())  # announced before the restart
        return state

    @classmethod
    def _from_row(cls, row: Worker) -> WorkerState:
        return cls(
            id=row.id,
            name=row.name,
            status=WorkerStatus(row.status),
            tier=row.tier,
            transport=Transport(row.transport),
            capabilities=Capabilities.model_validate(row.capabilities),
            labels=dict(row.labels),
            assignments=list(row.assignments),
            services={s["name"]: ServiceStatus.model_validate(s) for s in row.services},
            load=Load.model_validate(row.load),
            endpoint=row.endpoint,
            trusted=row.trusted,
            version=row.version,
            registered_at=row.registered_at,
            last_heartbeat_at=row.last_heartbeat_at,
            status_changed_at=row.status_changed_at,
            drained=row.drained,
            runnable=frozenset(row.runnable) if row.runnable is not None else None,
            revoked=row.revoked,
            verified=row.verified,
            disagreements=row.disagreements,
            verify_streak=row.verify_streak,
            quarantined=row.quarantined,
            owner=row.owner,
        )

    def refresh_from(self, row: Worker) -> None:
        """Take what ``row`` holds (another coordinator wrote it); keep what lives only in this
        coordinator's memory: the placements of assignments still held, claims, GPU deadline."""
        fresh = WorkerState._from_row(row)
        for name in PERSISTED:
            setattr(self, name, getattr(fresh, name))
        self.placements = {n: p for n, p in self.placements.items() if n in self.assignments}

    def to_public(self) -> WorkerPublic:
        return WorkerPublic(
            id=self.id,
            name=self.name,
            status=self.status,
            tier=self.tier,
            tier_name=Tier(self.tier).label,
            capabilities=self.capabilities,
            labels=self.labels,
            owner=self.owner or self.labels.get("owner", ""),
            services=list(self.services.values()),
            assignments=list(self.assignments),
            load=self.load,
            transport=self.transport,
            trusted=self.trusted,
            refused=self.refused(),
            revoked=self.revoked,
            pause_reason=self.pause_reason if self.status is WorkerStatus.PAUSED else None,
            reputation=round(self.reputation, 4),
            quarantined=self.quarantined,
            verified=self.verified,
            disagreements=self.disagreements,
            version=self.version,
            endpoint=self.endpoint,
            registered_at=_dt(self.registered_at),
            last_heartbeat_at=_dt(self.last_heartbeat_at) if self.last_heartbeat_at else None,
        )


#: The fields a worker's row holds (:meth:`WorkerState.refresh_from` copies them).
PERSISTED = (
    "name", "status", "tier", "transport", "capabilities", "labels", "assignments", "services",
    "load", "endpoint", "trusted", "version", "registered_at", "last_heartbeat_at",
    "status_changed_at", "drained", "runnable", "revoked", "verified", "disagreements",
    "verify_streak", "quarantined", "owner",
)  # fmt: skip


def _dt(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


class Registry:
    """Every worker by id, and an index of who holds each service (so that choosing a worker for
    a request costs the same with 10 workers or 10,000: only the service's holders are looked at).

    The index follows ``WorkerState.assignments`` on its own: assigning the attribute (the
    scheduler, a refresh from the database) re-indexes that worker.
    """

    def __init__(self) -> None:
        self._workers: dict[str, WorkerState] = {}
        #: service -> {worker id: state} of the workers whose assignments include it
        self._holders: dict[str, dict[str, WorkerState]] = {}
        #: worker id -> the services it is indexed under
        self._indexed: dict[str, frozenset[str]] = {}
        self.lock = threading.RLock()

    def load(self, rows: Iterable[Worker]) -> None:
        with self.lock:
            for state in self._workers.values():
                state.registry = None
            self._workers, self._holders, self._indexed = {}, {}, {}
            for r in rows:
                self.put(WorkerState.from_row(r))

    def put(self, state: WorkerState) -> None:
        with self.lock:
            old = self._workers.get(state.id)
            if old is not None and old is not state:
                old.registry = None
            self._workers[state.id] = state
            state.registry = self
            self.reindex(state)

    def reindex(self, state: WorkerState) -> None:
        """File ``state`` under the services it is assigned now (and no others)."""
        with self.lock:
            if self._workers.get(state.id) is not state:
                return
            now = frozenset(state.assignments)
            before = self._indexed.get(state.id, frozenset())
            for name in before - now:
                holders = self._holders.get(name)
                if holders is not None:
                    holders.pop(state.id, None)
                    if not holders:
                        del self._holders[name]
            for name in now:
                self._holders.setdefault(name, {})[state.id] = state
            self._indexed[state.id] = now

    def get(self, worker_id: str) -> WorkerState | None:
        return self._workers.get(worker_id)

    def all(self) -> list[WorkerState]:
        return list(self._workers.values())

    def routable(self, service: str) -> list[WorkerState]:
        """Workers that may take a new request for ``service`` right now (its holders only)."""
        holders = self._holders.get(service)
        if not holders:
            return []
        return [w for w in list(holders.values()) if w.serves(service)]

    def replica_counts(self, exclude: str | None = None) -> dict[str, int]:
        counts: dict[str, int] = {}
        for w in list(self._workers.values()):
            if w.id == exclude or w.status not in HOLDING:
                continue
            for name in w.assignments:
                counts[name] = counts.get(name, 0) + 1
        return counts

    def healthy_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for w in list(self._workers.values()):
            for name in w.services:
                if w.serves(name):  # claims refused are not counted
                    counts[name] = counts.get(name, 0) + 1
        return counts
