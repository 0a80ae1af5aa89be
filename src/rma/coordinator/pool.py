"""The pool: the coordinator's composition root and its control-plane operations.

Everything here is synchronous and runs in FastAPI's thread pool (database calls); the request
path (the gateway) only reads :attr:`Pool.registry`.
"""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, bindparam, or_, update
from sqlmodel import col, select

from rma import __version__
from rma.catalog import Catalog, TierPolicy, TierRefused, load_catalog
from rma.coordinator import security
from rma.coordinator.clock import Clock
from rma.coordinator.cluster.changes import EVENT, KEYS, WORKER, reload_worker
from rma.coordinator.cluster.node import make_cluster
from rma.coordinator.credentials import ALL_HTTP, Credentials
from rma.coordinator.db import make_engine, migrate, session, sqlite_path
from rma.coordinator.endpoints import endpoint_problem
from rma.coordinator.errors import APIError
from rma.coordinator.events import EventBus
from rma.coordinator.handover import HandOvers
from rma.coordinator.registry import Registry, WorkerState
from rma.coordinator.scheduler.loop import Scheduler
from rma.coordinator.tables import ApiKey, Worker
from rma.schemas.api import (
    HeartbeatRequest,
    HeartbeatResponse,
    RegisterRequest,
    RegisterResponse,
    ServiceSpec,
    ServiceStatus,
    WorkerPublic,
)
from rma.schemas.enums import ServiceState, Tier, Transport, WorkerStatus
from rma.settings import CoordinatorSettings

log = logging.getLogger("rma.coordinator")

#: The message on a reported service the worker was not assigned (a claim refused).
REFUSED_MESSAGE = "refused: not assigned to this worker by the coordinator"


def private(path: Path, mode: int) -> None:
    """``chmod`` a path this process owns to ``mode`` (a file it does not own is left as is)."""
    try:
        if (
            path.exists()
            and path.stat().st_uid == os.getuid()
            and path.stat().st_mode & 0o777 != mode
        ):
            os.chmod(path, mode)
    except OSError as exc:
        log.warning("cannot make %s private (mode %o): %s", path, mode, exc)


def removed_error(state: WorkerState) -> APIError:
    """401 for a removed worker's credential; the code says who removed it.

    ``removed``: the operator (re-joining needs a new join token); ``evicted``: the sweeper, for
    silence (the agent re-joins with its saved worker secret and keeps its id).
    """
    if state.revoked:
        return APIError(
            401, "this worker was removed by the operator (rma admin remove)", "removed"
        )
    return APIError(
        401,
        "this worker was removed after a long silence; re-join with its worker_secret",
        "evicted",
    )


def _shown(services: dict[str, ServiceStatus]) -> dict[str, tuple[str, bool, str | None]]:
    """What routing reads of a worker's services (not their in-flight counts)."""
    return {n: (s.state.value, s.healthy, s.endpoint) for n, s in services.items()}


#: API keys made for workers' own services are named this, then the worker id.
SERVICE_KEY_PREFIX = "worker services "


class Pool:
    def __init__(
        self,
        settings: CoordinatorSettings,
        *,
        clock: Clock | None = None,
        engine: Engine | None = None,
        catalog: Catalog | None = None,
    ) -> None:
        self.settings = settings
        self.clock = clock or Clock()
        self.engine = engine or make_engine(settings.db_url)
        self.catalog = catalog or load_catalog(settings.catalog)
        self.policy = TierPolicy(
            gpu_min_vram_mb=settings.gpu_min_vram_mb,
            service_min_memory_mb=settings.service_min_memory_mb,
            service_min_cores=settings.service_min_cores,
            data_min_memory_mb=settings.data_min_memory_mb,
        )
        self.registry = Registry()
        self.events = EventBus(self.engine, self.clock)
        self.credentials = Credentials(self.engine, self.clock, settings.default_rpm)
        self.started_at = self.clock.time()
        #: Called with a worker id when its status changes (the gateway drops its tunnel, ...).
        self.on_status_change: list[Callable[[WorkerState], None]] = []
        #: worker id -> (credits, escrow) for the heartbeat answer (the gateway's ledger)
        self.credits_of: Callable[[str], tuple[float, float]] | None = None
        #: the same from memory only, ``None`` when memory does not know yet (the common
        #: heartbeat answers from it on the event loop; else the slow path reads the database)
        self.cached_credits_of: Callable[[str], tuple[float, float] | None] | None = None
        #: ``rma admin restore``: worker id -> {service: backup id}, sent once in its next
        #: heartbeat answer (in memory: a restart of the coordinator forgets a pending one).
        self.restores: dict[str, dict[str, str]] = {}
        #: ``rma admin drain`` of a data service's holder: its fresh backup before the hand-over.
        self.handovers = HandOvers(settings.handover_backup_timeout)
        #: Workers whose last heartbeat changed nothing but its time, load and in-flight counts:
        #: written to the database in one batch by :meth:`flush_heartbeats` (about once a
        #: second, the app's lifespan task), never by the heartbeat itself.
        self._beats: set[str] = set()
        #: The reconciliation loop: the one owner of assignments.
        self.scheduler = Scheduler(self)
        #: Leadership and change notices among coordinators sharing the database.
        self.cluster = make_cluster(self)
        if self.cluster.shared:
            self.credentials.announce = lambda s, ident: self.cluster.announce(s, KEYS, ident)
            self.events.announce = lambda s, ident: self.cluster.announce(s, EVENT, str(ident))
        self._ready = False

    @property
    def admin_key_file(self) -> Path:
        return self.settings.data_dir / "admin.key"

    @property
    def signing_key_file(self) -> Path | None:
        """Where the credential signing key lives: the operator's file, else (SQLite) beside
        the database, so coordinators sharing one SQLite file share it too; ``None`` (a shared
        database, no key file mounted): in the database."""
        if self.settings.signing_key_file is not None:
            return self.settings.signing_key_file
        sqlite_file = sqlite_path(self.settings.db_url)
        return sqlite_file.parent / "signing.key" if sqlite_file is not None else None

    def bootstrap(self) -> str | None:
        """Migrate, load secrets and the routing table.  Returns a newly made admin key, once."""
        if self._ready:
            return None
        data_dir = self.settings.data_dir
        data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        private(data_dir, 0o700)  # also when it was there before rma
        sqlite_file = sqlite_path(self.settings.db_url)
        if sqlite_file is not None:
            sqlite_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        migrate(self.engine)
        if sqlite_file is not None:
            for suffix in ("", "-wal", "-shm", "-journal"):
                private(sqlite_file.with_name(sqlite_file.name + suffix), 0o600)
        created = self.credentials.bootstrap(self.admin_key_file, self.signing_key_file)
        with session(self.engine) as s:
            self.registry.load(s.exec(select(Worker)).all())
        self.scheduler.run("coordinator started")
        self.started_at = self.clock.time()
        for w in self.registry.all():  # GPU claims not yet shown: a new window from this start
            self._watch_gpu(w, self.started_at)
        self._ready = True
        return created

    # --- registration -----------------------------------------------------------------------------

    def _reclaim(self, req: RegisterRequest) -> Worker | None:
        """The worker's old record, when the request proves it is that worker.

        ``worker_id`` of a record this coordinator does not know (its database was reset): a new
        registration, which needs a join token.  A known ``worker_id`` with a missing or wrong
        ``worker_secret``: 401, so nobody takes over another worker's record.  A worker the
        operator removed (``rma admin remove``: revoked) comes back only with a new join token
        (the operator's consent); one the sweeper removed for its silence (a laptop that slept)
        comes back with its secret alone, under its old id.
        """
        if not req.worker_id:
            return None
        with session(self.engine) as s:
            row = s.get(Worker, req.worker_id)
        if row is None:
            return None
        secret = req.worker_secret or ""
        if not row.secret_hash or not security.same_hash(secret, row.secret_hash):
            problem = "does not match" if secret else "is required to re-join as"
            raise APIError(
                401,
                f"worker_secret {problem} worker {req.worker_id}; to register as a new worker, "
                "join without worker_id (with a join token)",
                "invalid_worker_secret",
            )
        if row.status == WorkerStatus.REMOVED and row.revoked and not req.token:
            raise APIError(
                401,
                "this worker was removed by the operator (rma admin remove); join again with a "
                "new token",
                "removed",
            )
        return row

    def register(self, req: RegisterRequest, *, peer: str = "127.0.0.1") -> RegisterResponse:
        now = self.clock.time()
        if req.transport is Transport.DIRECT and req.endpoint:
            problem = endpoint_problem(
                req.endpoint,
                peer,
                trust=self.settings.trust_worker_endpoints,
                local_only=self.settings.local_only,
            )
            if problem:
                raise APIError(422, f"endpoint {req.endpoint} refused: {problem}", "bad_endpoint")
        old = self._reclaim(req)
        token_id: str | None = None
        if old is None or (old.status == WorkerStatus.REMOVED and old.revoked):
            if not req.token:
                raise APIError(
                    401, "a join token is required (rma admin tokens create)", "invalid_token"
                )
            token_id = self.credentials.check_token(req.token)
        try:
            tier = self.policy.tier_for(req.capabilities)
        except TierRefused as exc:
            raise APIError(422, f"registration refused: {exc}", "tier_refused") from None
        worker_id = old.id if old else secrets.token_hex(8)
        with self.registry.lock:
            if token_id is not None:
                self.credentials.consume_token(token_id)
            new_secret = None if old else "rma_worker_" + secrets.token_urlsafe(32)
            row = old or Worker(
                id=worker_id,
                registered_at=now,
                secret_hash=security.hash_secret(new_secret or ""),
                token_id=token_id,
                name=req.name,
                status=WorkerStatus.ONLINE,
                tier=int(tier),
                capabilities={},
                labels={},
                services=[],
                assignments=[],
                load={},
                transport=req.transport.value,
                status_changed_at=now,
            )
            if token_id is not None:
                row.token_id = token_id
            row.name = req.name
            row.status = WorkerStatus.ONLINE
            row.tier = int(tier)
            row.capabilities = req.capabilities.model_dump(mode="json")
            row.labels = dict(req.labels)
            row.owner = req.owner
            row.services = []
            row.runnable = sorted(set(req.runnable)) if req.runnable is not None else None
            row.transport = req.transport.value
            row.endpoint = req.endpoint
            row.version = req.version
            row.last_heartbeat_at = now
            row.status_changed_at = now
            row.revoked = False
            with session(self.engine) as s:
                s.merge(row)
                self.cluster.announce(s, WORKER, worker_id)
            state = WorkerState.from_row(row)
            self.registry.put(state)
            changes = self.scheduler.run_for(state, f"worker {req.name} joined", emit=False)
            names = list(state.assignments)
            self._watch_gpu(state, now)  # once the scheduler gave it its (GPU) services
        kind = "rejoined" if old else "joined"
        self.events.emit(
            kind,
            f"worker {req.name} {kind} as tier {tier.label} with "
            f"{', '.join(names) or 'no services'}",
            worker_id,
            {"tier": int(tier), "assignments": names, "transport": req.transport.value},
        )
        self.scheduler.emit(changes, f"worker {req.name} {kind}")
        self._notify(state)
        credential, expires = security.issue_credential(
            self.credentials.signing_key, worker_id, now, self.settings.credential_ttl
        )
        return RegisterResponse(
            worker_id=worker_id,
            tier=int(tier),
            tier_name=tier.label,
            credential=credential,
            credential_expires_at=datetime.fromtimestamp(expires, UTC),
            heartbeat_interval=self.settings.heartbeat_interval,
            assignments=self.assignments_of(state),
            worker_secret=new_secret,
            service_key=self._service_key(worker_id),
        )

    def _service_key(self, worker_id: str) -> str | None:
        """A fresh gateway API key for the worker's pool-calling services; the old one revoked.

        Only where clients need keys: an anonymous pool's services need none.  It reaches every
        HTTP and OpenAI service, and of the data tier only ``service_key_data`` (``postgres``:
        where rag and notes keep their stores).
        """
        if self.settings.anonymous_clients:
            return None
        name = f"{SERVICE_KEY_PREFIX}{worker_id}"
        with session(self.engine) as s:  # its own keys only (not every key in the pool)
            live = col(ApiKey.revoked).is_(False)
            stale = s.exec(select(ApiKey.id).where(ApiKey.name == name, live)).all()
        for key_id in stale:
            self.credentials.revoke_key(key_id)
        data = self.settings.service_key_data
        services = [ALL_HTTP, *data] if data else None
        return self.credentials.create_key(name, rpm=None, services=services).key

    # --- worker credentials -----------------------------------------------------------------------

    def authenticate_worker(
        self, credential: str, *, lookup: bool = False
    ) -> tuple[WorkerState, float]:
        """The worker a credential belongs to and the credential's expiry.

        401 when it is invalid or expired, or the worker was removed.  With ``lookup`` (off the
        event loop only) a worker this coordinator does not know is looked up in the database:
        it may have registered on another coordinator a moment ago.
        """
        try:
            cred = security.verify_credential(
                self.credentials.signing_key,
                credential,
                self.clock.time(),
                max_ttl=self.settings.credential_ttl,
            )
        except security.CredentialError as exc:
            raise APIError(401, str(exc), "invalid_credential") from None
        state = self.registry.get(cred.worker_id)
        if state is None and lookup:
            state = reload_worker(self, cred.worker_id)
        if state is None:
            raise APIError(
                401, "this coordinator does not know the worker; register again", "unknown_worker"
            )
        if state.status is WorkerStatus.REMOVED:
            raise removed_error(state)
        return state, cred.expires_at

    # --- heartbeats -------------------------------------------------------------------------------

    def heartbeat(
        self,
        state: WorkerState,
        req: HeartbeatRequest,
        credential_expires: float,
        *,
        peer: str = "127.0.0.1",
    ) -> HeartbeatResponse:
        now = self.clock.time()
        transitions: list[tuple[str, str, dict[str, Any]]] = []
        with self.registry.lock:
            state = self.registry.get(state.id) or state  # a re-registration replaced it
            # re-checked under the lock: an operator's remove may have landed since authentication
            if state.status is WorkerStatus.REMOVED:
                raise removed_error(state)
            if state.status is WorkerStatus.LEFT:
                raise APIError(409, "this worker has left; register again", "left")
            before = state.status
            state.pause_reason = req.pause_reason if req.paused else None
            if req.paused:
                state.status = WorkerStatus.PAUSED
            elif req.draining or state.drained:
                state.status = WorkerStatus.DRAINING
            else:
                state.status = WorkerStatus.ONLINE
            if state.status is not before:
                state.status_changed_at = now
                why = f": {req.pause_reason}" if req.paused and req.pause_reason else ""
                transitions.append(
                    (
                        state.status.value,
                        f"worker {state.name} is {state.status.value} (was {before.value}){why}",
                        {"from": before.value, "reason": state.pause_reason},
                    )
                )
            old_services = state.services
            legit_before = {n for n in old_services if n not in state.claims}
            state.services = {s.name: self._checked(state, s, peer) for s in req.services}
            refused = set(state.refused())
            for name in sorted(refused):
                svc = state.services[name]
                state.services[name] = svc.model_copy(
                    update={"healthy": False, "message": REFUSED_MESSAGE}
                )
                if name in state.claims:
                    continue  # once per claim, not once per heartbeat
                if name in legit_before and name not in state.claim_grace:
                    state.claim_grace.add(name)  # just unassigned: one heartbeat to stop it
                    continue
                state.claims.add(name)
                transitions.append(
                    (
                        "claim_refused",
                        f"worker {state.name} reports {name}, which it was not assigned: "
                        "no requests go to it",
                        {"service": name, "endpoint": svc.endpoint, "healthy": svc.healthy},
                    )
                )
            state.claims &= refused
            state.claim_grace &= refused
            for svc in state.services.values():
                if svc.name not in state.assignments:
                    continue
                prev = old_services.get(svc.name)
                if prev is None or prev.state != svc.state or prev.healthy != svc.healthy:
                    word = "healthy" if svc.healthy else svc.state.value
                    if svc.state is ServiceState.REFUSED:  # the donor's policy said no
                        transitions.append(
                            (
                                "assignment_refused",
                                f"{state.name} refused to run {svc.name}: {svc.message}",
                                {"service": svc.name, "message": svc.message},
                            )
                        )
                        continue
                    transitions.append(
                        (
                            "service",
                            f"{svc.name} on {state.name} is {word}",
                            {
                                "service": svc.name,
                                "state": svc.state.value,
                                "healthy": svc.healthy,
                                "message": svc.message,
                            },
                        )
                    )
            if state.gpu_deadline is not None and any(
                n in state.services and state.services[n].healthy
                for n in self._gpu_services(state.assignments)
            ):
                state.gpu_deadline = None  # the GPU did real work: the claim holds
            state.load = req.load
            state.last_heartbeat_at = now
            if transitions or _shown(old_services) != _shown(state.services):
                # a change: written now and told to the other coordinators (changes.py)
                self._save(state)
                self._beats.discard(state.id)
            else:  # time, load and in-flight counts only: the next batch writes them
                self._beats.add(state.id)
        for kind, message, data in transitions:
            self.events.emit(kind, message, state.id, data)
        if transitions:
            self.scheduler.run_for(state, transitions[-1][1])
            self._notify(state)
        resp = HeartbeatResponse(
            assignments=self.assignments_of(state),
            heartbeat_interval=self.settings.heartbeat_interval,
            status=state.status,
            restore=self.restores.pop(state.id, {}),
            backup=self.handovers.asked_of(state.id),
        )
        if self.credits_of is not None:
            try:
                resp.credits, resp.escrow = self.credits_of(state.id)
            except Exception:  # the ledger is informative here: never fail a heartbeat for it
                log.exception("could not read the credits of worker %s", state.name)
        if credential_expires - now < self.settings.credential_ttl / 2:
            token, exp = security.issue_credential(
                self.credentials.signing_key, state.id, now, self.settings.credential_ttl
            )
            resp.credential = token
            resp.credential_expires_at = datetime.fromtimestamp(exp, UTC)
        return resp

    def quick_heartbeat(
        self,
        state: WorkerState,
        req: HeartbeatRequest,
        credential_expires: float,
        *,
        peer: str = "127.0.0.1",
    ) -> HeartbeatResponse | None:
        """The common heartbeat, from memory only (the route calls it on the event loop).

        When nothing but the time, load and in-flight counts changed it does what
        :meth:`heartbeat` would do (the registry updated, the row left to the next batch) and
        answers; anything else (a status, pause reason or service health that changed, a claim,
        a GPU deadline, a restore to send, credits memory does not know yet, the registry's lock
        busy) returns ``None`` without changing anything: the caller runs :meth:`heartbeat` in a
        thread.  It never waits for the lock nor reads the database.
        """
        lock = self.registry.lock
        if not lock.acquire(blocking=False):
            return None
        try:
            current = self.registry.get(state.id)
            if current is None or current is not state:
                return None  # a re-registration replaced it, or it is gone: the slow path says
            if req.paused:
                status = WorkerStatus.PAUSED
            elif req.draining or state.drained:
                status = WorkerStatus.DRAINING
            else:
                status = WorkerStatus.ONLINE
            if (
                status is not state.status
                or (req.pause_reason if req.paused else None) != state.pause_reason
                or state.claims
                or state.claim_grace
                or state.gpu_deadline is not None
                or state.id in self.restores
            ):
                return None
            services = {s.name: self._checked(state, s, peer) for s in req.services}
            if any(n not in state.assignments for n in services):
                return None  # a claim: refused in the slow path
            if _shown(services) != _shown(state.services):
                return None  # a service's state, health or endpoint changed: written now
            credits: tuple[float, float] | None = None
            if self.credits_of is not None:
                credits = self.cached_credits_of(state.id) if self.cached_credits_of else None
                if credits is None:
                    return None
            state.services = services
            state.load = req.load
            state.last_heartbeat_at = now = self.clock.time()
            self._beats.add(state.id)
        finally:
            lock.release()
        resp = HeartbeatResponse(
            assignments=self.assignments_of(state),
            heartbeat_interval=self.settings.heartbeat_interval,
            status=state.status,
            backup=self.handovers.asked_of(state.id),
        )
        if credits is not None:
            resp.credits, resp.escrow = credits
        if credential_expires - now < self.settings.credential_ttl / 2:
            token, exp = security.issue_credential(
                self.credentials.signing_key, state.id, now, self.settings.credential_ttl
            )
            resp.credential = token
            resp.credential_expires_at = datetime.fromtimestamp(exp, UTC)
        return resp

    def _checked(self, state: WorkerState, svc: ServiceStatus, peer: str) -> ServiceStatus:
        """A direct worker's service whose endpoint the gateway must not use is not healthy."""
        if state.transport is not Transport.DIRECT or not svc.endpoint:
            return svc
        problem = endpoint_problem(
            svc.endpoint,
            peer,
            trust=self.settings.trust_worker_endpoints,
            local_only=self.settings.local_only,
        )
        if problem is None:
            return svc
        message = f"endpoint {svc.endpoint} refused: {problem}"
        return svc.model_copy(update={"healthy": False, "message": message[:1000]})

    def assignments_of(self, state: WorkerState) -> list[ServiceSpec]:
        """The worker's part of the plan: catalog specs with the GPU placement filled in."""
        if state.status in (WorkerStatus.REMOVED, WorkerStatus.LEFT):
            return []
        specs = []
        for name in state.assignments:
            spec = self.catalog.get(name)
            if spec is None:
                continue
            placed = state.placements.get(name)
            if placed is not None and placed.gpus:
                spec = spec.model_copy(
                    update={"gpu_devices": list(placed.gpus), "gpu_share": placed.gpu_share}
                )
            specs.append(spec)
        return specs

    def reload_catalog(self) -> Catalog:
        """Read the catalog files again and place services by it (``rma admin catalog reload``).

        A malformed file changes nothing: 422 with the loader's message.
        """
        from rma.catalog import CatalogError

        try:
            catalog = load_catalog(self.settings.catalog)
        except CatalogError as exc:
            raise APIError(422, f"catalog not reloaded: {exc}", "bad_catalog") from None
        with self.registry.lock:
            before = set(self.catalog)
            self.catalog = catalog
            changes = self.scheduler.run("catalog reloaded", emit=False)
        added, gone = sorted(set(catalog) - before), sorted(before - set(catalog))
        self.events.emit(
            "catalog_reloaded",
            f"catalog reloaded: {len(catalog)} services"
            + (f", added {', '.join(added)}" if added else "")
            + (f", dropped {', '.join(gone)}" if gone else ""),
            data={"services": len(catalog), "added": added, "dropped": gone},
        )
        self.scheduler.emit(changes, "catalog reloaded")
        return catalog

    def leave(self, state: WorkerState) -> None:
        self._set_status(state, WorkerStatus.LEFT, "left", f"worker {state.name} left the pool")

    # --- admin actions ----------------------------------------------------------------------------

    def get(self, worker_id: str) -> WorkerState:
        state = self.registry.get(worker_id)
        if state is None and self.cluster.shared:  # registered on another coordinator just now
            state = reload_worker(self, worker_id)
        if state is None:
            raise APIError(404, f"no worker {worker_id!r}")
        return state

    def drain(self, worker_id: str) -> WorkerPublic:
        """No new requests for this worker, until undrained (also across going offline)."""
        state = self.get(worker_id)
        live = (
            WorkerStatus.ONLINE,
            WorkerStatus.DRAINING,
            WorkerStatus.OFFLINE,
            WorkerStatus.PAUSED,
        )
        if state.status not in live:
            raise APIError(
                409, f"worker {state.name} is {state.status.value}; only a live worker can drain"
            )
        self._set_drained(state, True)
        if state.status is WorkerStatus.ONLINE:
            self._ask_fresh_backups(state)
            self._set_status(
                state, WorkerStatus.DRAINING, "drained", f"worker {state.name} is draining"
            )
        else:
            self.scheduler.run(f"worker {state.name} drained")
        return state.to_public()

    def undrain(self, worker_id: str) -> WorkerPublic:
        state = self.get(worker_id)
        if not state.drained and state.status is not WorkerStatus.DRAINING:
            raise APIError(409, f"worker {state.name} is {state.status.value}, not draining")
        self._set_drained(state, False)
        self.handovers.forget_worker(state.id)
        if state.status is WorkerStatus.DRAINING:
            self._set_status(
                state, WorkerStatus.ONLINE, "undrained", f"worker {state.name} takes requests again"
            )
        else:
            self.scheduler.run(f"worker {state.name} undrained")
        return state.to_public()

    def _ask_fresh_backups(self, state: WorkerState) -> None:
        """Before a drain hands them over: the holder's data services with a catalog ``backup``
        that it runs healthy wait for one more backup (:mod:`rma.coordinator.handover`)."""
        now = self.clock.time()
        for name in state.assignments:
            spec = self.catalog.get(name)
            svc = state.services.get(name)
            if spec is None or spec.backup is None or svc is None or not svc.healthy:
                continue
            if self.handovers.request(name, state.id, state.name, now) is None:
                return
            self.events.emit(
                "backup_requested",
                f"{name} on worker {state.name}: a fresh backup before the drain hands it over",
                state.id,
                data={"service": name, "timeout": self.handovers.timeout},
            )

    def fresh_backup_arrived(self, service: str, worker_id: str) -> None:
        """A holder uploaded a backup: when a drain waited for it, place the service now."""
        done = self.handovers.arrived(service, worker_id)
        if done is not None:
            self.scheduler.run(f"fresh backup of {service} from worker {done.worker} is in")

    def drains_here(self, worker_id: str) -> bool:
        """The worker is draining and still heard (a hand-over backup can still come from it)."""
        state = self.registry.get(worker_id)
        return state is not None and state.drained and state.status is WorkerStatus.DRAINING

    def set_trusted(self, worker_id: str, trusted: bool) -> WorkerPublic:
        """Mark a worker trusted (or not): requests with ``x-rma-trusted: 1`` go only to those."""
        state = self.get(worker_id)
        if state.status is WorkerStatus.REMOVED:
            raise APIError(409, f"worker {state.name} is removed")
        with self.registry.lock:
            if state.trusted is trusted:
                return state.to_public()
            state.trusted = trusted
            self._save(state)
        word = "trusted" if trusted else "untrusted"
        self.events.emit(word, f"worker {state.name} is {word} by the operator", state.id)
        return state.to_public()

    def set_quarantined(
        self,
        worker_id: str,
        quarantined: bool,
        message: str | None = None,
        evidence: dict[str, Any] | None = None,
    ) -> WorkerPublic:
        """Keep client traffic away from a worker (or let it back): ``quarantined`` events.

        Lifting a quarantine also clears the worker's verification record: it starts again as
        a new worker (verified at the new-worker rate).
        """
        state = self.get(worker_id)
        if state.status is WorkerStatus.REMOVED:
            raise APIError(409, f"worker {state.name} is removed")
        with self.registry.lock:
            if state.quarantined is quarantined:
                return state.to_public()
            state.quarantined = quarantined
            if not quarantined:
                state.verified = state.disagreements = state.verify_streak = 0
            self._save(state)
        kind = "quarantined" if quarantined else "unquarantined"
        default = (
            f"worker {state.name} is quarantined by the operator"
            if quarantined
            else f"worker {state.name} takes client traffic again"
        )
        self.events.emit(kind, message or default, state.id, evidence or {})
        self._notify(state)
        self.scheduler.run(f"worker {state.name} {kind}")  # its services placed elsewhere
        return state.to_public()

    def save_verification(self, state: WorkerState) -> None:
        """Persist a worker's verification counts (called off the event loop)."""
        with self.registry.lock:
            self._save(state)

    def _set_drained(self, state: WorkerState, drained: bool) -> None:
        with self.registry.lock:
            if state.drained is drained:
                return
            state.drained = drained
            self._save(state)
        if state.status is WorkerStatus.OFFLINE:  # no status change to report it
            word = "drained" if drained else "undrained"
            self.events.emit(word, f"worker {state.name} (offline) is {word}", state.id)

    def remove(self, worker_id: str) -> WorkerPublic:
        state = self.get(worker_id)
        if state.status is WorkerStatus.REMOVED and state.revoked:
            raise APIError(409, f"worker {state.name} is already removed")
        with self.registry.lock:
            state.revoked = True  # only the operator revokes; the sweeper's removal is not one
            self._save(state)
        if state.status is WorkerStatus.REMOVED:  # the sweeper removed it already: now revoked
            self.events.emit(
                "removed", f"worker {state.name} was removed by the operator", state.id,
                {"from": state.status.value, "revoked": True},
            )  # fmt: skip
            return state.to_public()
        self._set_status(
            state,
            WorkerStatus.REMOVED,
            "removed",
            f"worker {state.name} was removed by the operator",
            {"revoked": True},
        )
        return state.to_public()

    # --- claimed hardware -------------------------------------------------------------------------

    def _gpu_services(self, names: list[str]) -> list[str]:
        gpu = int(Tier.GPU)
        return [
            n
            for n in names
            if n in self.catalog and (self.catalog[n].gpu or self.catalog[n].tier == gpu)
        ]

    def _watch_gpu(self, state: WorkerState, now: float) -> None:
        """Start the window in which a GPU-tier worker must show its GPU by a healthy service."""
        if state.tier != int(Tier.GPU) or state.status is not WorkerStatus.ONLINE:
            return
        gpu = self._gpu_services(state.assignments)
        if gpu and not any(n in state.services and state.services[n].healthy for n in gpu):
            state.gpu_deadline = now + self.settings.gpu_verify_window

    def check_gpu_claims(self) -> list[str]:
        """Take the GPU services from GPU-tier workers that never got one healthy in time and
        re-tier them by their other hardware (the sweeper calls it).  Returns their ids."""
        now = self.clock.time()
        demoted: list[str] = []
        for state in self.registry.all():
            deadline = state.gpu_deadline
            if deadline is None or now < deadline or state.status in (
                WorkerStatus.REMOVED, WorkerStatus.LEFT,
            ):  # fmt: skip
                continue
            caps = state.capabilities.model_copy(update={"gpus": []})
            try:
                tier = self.policy.tier_for(caps)
            except TierRefused:
                tier = Tier.DATA
            with self.registry.lock:
                dropped = self._gpu_services(state.assignments)
                state.assignments = [n for n in state.assignments if n not in dropped]
                state.tier = int(tier)
                state.gpu_deadline = None
                self._save(state)
            self.events.emit(
                "gpu_unverified",
                f"worker {state.name} reports a GPU, but {', '.join(dropped)} never became "
                f"healthy within {self.settings.gpu_verify_window:g} s: unassigned, and the "
                f"worker is tier {tier.label} now",
                state.id,
                {"dropped": dropped, "tier": int(tier)},
            )
            self._notify(state)
            demoted.append(state.id)
        if demoted:  # their GPU services go to workers whose GPUs are real
            self.scheduler.run("unverified GPUs re-tiered")
        return demoted

    # --- shared helpers ---------------------------------------------------------------------------

    def _set_status(
        self,
        state: WorkerState,
        status: WorkerStatus,
        kind: str,
        message: str,
        data: dict[str, Any] | None = None,
    ) -> None:
        with self.registry.lock:
            before = state.status
            if before is status:
                return
            state.status = status
            state.status_changed_at = self.clock.time()
            if status in (WorkerStatus.LEFT, WorkerStatus.REMOVED):
                state.services = {
                    n: ServiceStatus(name=n, state=s.state, healthy=False, endpoint=s.endpoint)
                    for n, s in state.services.items()
                }
            self._save(state)
        self.events.emit(kind, message, state.id, {"from": before.value, **(data or {})})
        self.scheduler.run_for(state, message)
        self._notify(state)

    def _save(self, state: WorkerState, *, announce: bool = True) -> None:
        with session(self.engine) as s:
            row = s.get(Worker, state.id)
            if row is None:
                return
            row.status = state.status.value
            row.tier = state.tier
            row.services = [v.model_dump(mode="json") for v in state.services.values()]
            row.assignments = list(state.assignments)
            row.load = state.load.model_dump(mode="json")
            if (row.last_heartbeat_at or 0.0) > (state.last_heartbeat_at or 0.0):
                # heard by another coordinator since this one did: never moved back
                state.last_heartbeat_at = row.last_heartbeat_at
            row.last_heartbeat_at = state.last_heartbeat_at
            row.status_changed_at = state.status_changed_at
            row.drained = state.drained
            row.trusted = state.trusted
            row.revoked = state.revoked
            row.verified = state.verified
            row.disagreements = state.disagreements
            row.verify_streak = state.verify_streak
            row.quarantined = state.quarantined
            s.add(row)
            if announce and self.cluster.shared:
                self.cluster.announce(s, WORKER, state.id)

    def flush_heartbeats(self) -> int:
        """Write the heartbeats :meth:`heartbeat` left for later, in one transaction; returns
        how many rows it wrote.

        A heartbeat that changed nothing but its time, load and in-flight counts is not
        written by the request (which would hold the registry's lock across a database commit,
        once per heartbeat: at 10,000 workers every heartbeat queued behind the others'
        commits).  Only those columns are written here, and only over an older heartbeat
        (``last_heartbeat_at`` moves forward only), so a full save made since wins.
        """
        with self.registry.lock:
            ids, self._beats = self._beats, set()
            rows: list[dict[str, Any]] = []
            for worker_id in ids:
                state = self.registry.get(worker_id)
                if state is None or state.last_heartbeat_at is None:
                    continue
                rows.append(
                    {
                        "b_id": worker_id,
                        "b_ts": state.last_heartbeat_at,
                        "b_load": state.load.model_dump(mode="json"),
                        "b_services": [v.model_dump(mode="json") for v in state.services.values()],
                    }
                )
        if not rows:
            return 0
        table = Worker.__table__  # type: ignore[attr-defined]
        t = table.c
        stmt = (
            update(table)
            .where(t.id == bindparam("b_id"))
            .where(or_(t.last_heartbeat_at.is_(None), t.last_heartbeat_at < bindparam("b_ts")))
            .values(
                last_heartbeat_at=bindparam("b_ts"),
                load=bindparam("b_load"),
                services=bindparam("b_services"),
            )
        )
        try:
            with self.engine.begin() as conn:
                conn.execute(stmt, rows)
        except Exception:
            with self.registry.lock:  # tried again with the next batch
                self._beats.update(r["b_id"] for r in rows)
            raise
        return len(rows)

    def _notify(self, state: WorkerState) -> None:
        for hook in list(self.on_status_change):
            hook(state)

    # --- reporting --------------------------------------------------------------------------------

    def services(
        self, inflight: dict[str, int] | None = None, queued: dict[str, int] | None = None
    ) -> list[dict[str, Any]]:
        """``rma admin services``: per catalog service, wanted / assigned / healthy and load.

        ``inflight`` and ``queued`` are the gateway's counters (absent without a gateway); the
        in-flight figure is the larger of those and what the workers report (their count
        includes other coordinators').
        """
        plan = self.scheduler.last
        healthy = self.registry.healthy_counts()
        reported: dict[str, int] = {}
        for w in self.registry.all():
            for name, st in w.services.items():
                if w.serves(name):
                    reported[name] = reported.get(name, 0) + st.inflight
        out = []
        for spec in self.catalog.values():
            mine = (inflight or {}).get(spec.name, 0)
            out.append(
                {
                    "name": spec.name,
                    "tier": spec.tier,
                    "replicas": spec.replicas,
                    "max_replicas": spec.max_replicas,
                    "priority": spec.priority,
                    "wanted": plan.wanted.get(spec.name, spec.replicas),
                    "assigned": plan.assigned(spec.name),
                    "healthy": healthy.get(spec.name, 0),
                    "inflight": max(mine, reported.get(spec.name, 0)),
                    "queued": (queued or {}).get(spec.name, 0),
                    "last_scaling_event": self.scheduler.last_scaling.get(spec.name),
                }
            )
        return out

    def stats(self) -> dict[str, Any]:
        workers = self.registry.all()
        by_status = {s.value: 0 for s in WorkerStatus}
        by_tier = {t.label: 0 for t in Tier}
        for w in workers:
            by_status[w.status.value] += 1
            if w.status in (WorkerStatus.ONLINE, WorkerStatus.DRAINING):
                by_tier[Tier(w.tier).label] += 1
        healthy = self.registry.healthy_counts()
        assigned = self.registry.replica_counts()
        services = [
            {
                "name": spec.name,
                "tier": spec.tier,
                "kind": spec.kind,
                "wanted": spec.replicas,
                "assigned": assigned.get(spec.name, 0),
                "healthy": healthy.get(spec.name, 0),
            }
            for spec in self.catalog.values()
        ]
        return {
            "version": __version__,
            "uptime_s": round(self.clock.time() - self.started_at, 1),
            "workers": {"total": len(workers), "by_status": by_status, "by_tier": by_tier},
            "services": services,
        }
