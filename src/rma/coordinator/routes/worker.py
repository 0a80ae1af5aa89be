"""``/api/worker/*``: what agents call."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, StreamingResponse

from rma.coordinator import security
from rma.coordinator.auth import (
    FailureLimiter,
    PoolDep,
    QuickWorkerDep,
    WorkerDep,
    client_addr,
)
from rma.coordinator.backups import BackupStore
from rma.coordinator.errors import APIError
from rma.coordinator.registry import WorkerState
from rma.schemas.api import (
    BackupPublic,
    HeartbeatRequest,
    HeartbeatResponse,
    RegisterRequest,
    RegisterResponse,
)

router = APIRouter(prefix="/api/worker", tags=["worker"])


@router.post("/register", status_code=201)
def register(req: RegisterRequest, request: Request, pool: PoolDep) -> RegisterResponse:
    limiter: FailureLimiter = request.app.state.auth_limiter
    addr = client_addr(request)
    try:
        return pool.register(req, peer=addr)
    except APIError as exc:
        if exc.status != 401:
            raise
        # a failure counts for its role from this address, and against the token it named
        role = "worker-secret" if exc.code == "invalid_worker_secret" else "join"
        ident = security.split_prefixed(req.token or "", security.TOKEN_PREFIX)
        extra = (f"join-token|{ident}",) if ident and role == "join" else ()
        raise limiter.refuse(limiter.buckets(role, addr, *extra), exc) from None


@router.post("/heartbeat")
async def heartbeat(
    req: HeartbeatRequest, who: QuickWorkerDep, pool: PoolDep, request: Request
) -> HeartbeatResponse:
    """On the event loop when nothing but time, load and in-flight counts changed (memory
    only: no thread, no database); anything else runs :meth:`Pool.heartbeat` in a thread."""
    state, expires = who
    peer = client_addr(request)
    quick = pool.quick_heartbeat(state, req, expires, peer=peer)
    if quick is not None:
        return quick
    return await run_in_threadpool(pool.heartbeat, state, req, expires, peer=peer)


@router.post("/leave", status_code=204)
def leave(who: WorkerDep, pool: PoolDep) -> Response:
    pool.leave(who[0])
    return Response(status_code=204)


def _backed_up(pool: PoolDep, state: WorkerState, service: str) -> None:
    """403 unless ``service`` has a catalog ``backup`` and is assigned to this worker."""
    spec = pool.catalog.get(service)
    if spec is None or spec.backup is None:
        raise APIError(404, f"service {service!r} has no backup in the catalog", "not_found")
    if service not in state.assignments:
        raise APIError(403, f"service {service!r} is not assigned to this worker", "not_assigned")


@router.put("/backups/{service}", status_code=201)
async def upload_backup(
    service: str, who: WorkerDep, pool: PoolDep, request: Request
) -> BackupPublic:
    """A holder's backup of one of its data services (the body is the backup)."""
    state, _ = who
    _backed_up(pool, state, service)
    store: BackupStore = request.app.state.backups
    saved = await store.save(service, state.id, state.name, request.stream())
    pool.fresh_backup_arrived(service, state.id)  # a drain that waited for it hands over now
    return saved


@router.get("/backups/{service}", response_class=FileResponse)
async def latest_backup(
    service: str, who: WorkerDep, pool: PoolDep, request: Request, id: str | None = None
) -> Response:
    """The newest backup of a service assigned to this worker (to restore before it is
    healthy), or the one ``id`` names; 404 ``no_backup`` when there is none (yet), 503
    ``backup_store_unavailable`` when its store cannot be read (never an empty answer then)."""
    state, _ = who
    _backed_up(pool, state, service)
    store: BackupStore = request.app.state.backups
    info, body = await store.open(service, id)
    return StreamingResponse(
        body,
        media_type="application/octet-stream",
        headers={
            "content-length": str(info.size),
            "x-rma-backup-id": info.id,
            "x-rma-backup-sha256": info.sha256,
            "x-rma-backup-worker": info.worker,
        },
    )
