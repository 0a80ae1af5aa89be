"""``/api/worker/*``: what agents call."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from rma.coordinator.auth import PoolDep, WorkerDep, client_addr
from rma.coordinator.errors import APIError
from rma.schemas.api import HeartbeatRequest, HeartbeatResponse, RegisterRequest, RegisterResponse

router = APIRouter(prefix="/api/worker", tags=["worker"])


@router.post("/register", status_code=201)
def register(req: RegisterRequest, request: Request, pool: PoolDep) -> RegisterResponse:
    limiter = request.app.state.auth_limiter
    addr = client_addr(request)
    limiter.check(addr)
    try:
        return pool.register(req, peer=addr)
    except APIError as exc:
        if exc.status == 401:
            limiter.fail(addr)
        raise


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
