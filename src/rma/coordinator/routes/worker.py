"""``/api/worker/*``: what agents call."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from rma.coordinator import security
from rma.coordinator.auth import FailureLimiter, PoolDep, WorkerDep, client_addr
from rma.coordinator.errors import APIError
from rma.schemas.api import HeartbeatRequest, HeartbeatResponse, RegisterRequest, RegisterResponse

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
def heartbeat(
    req: HeartbeatRequest, who: WorkerDep, pool: PoolDep, request: Request
) -> HeartbeatResponse:
    state, expires = who
    return pool.heartbeat(state, req, expires, peer=client_addr(request))


@router.post("/leave", status_code=204)
def leave(who: WorkerDep, pool: PoolDep) -> Response:
    pool.leave(who[0])
    return Response(status_code=204)
