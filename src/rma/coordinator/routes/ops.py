"""Operations: liveness, readiness, Prometheus metrics."""

from __future__ import annotations

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse

from rma.coordinator.auth import PoolDep
from rma.coordinator.db import ping
from rma.coordinator.errors import APIError

router = APIRouter(tags=["ops"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(pool: PoolDep, request: Request) -> dict[str, str | None]:
    """Ready when the database answers; names this coordinator, the leader and its role."""
    guard = getattr(request.app.state, "connections", None)  # set when served by uvicorn
    why = guard.saturated() if guard is not None else None
    if why:
        raise APIError(503, f"the coordinator is saturated: {why}", "saturated")
    if not await anyio.to_thread.run_sync(ping, pool.engine):
        raise APIError(503, "the database is not reachable", "db_unreachable")
    body: dict[str, str | None] = {"status": "ready", **pool.cluster.describe()}
    for part in getattr(request.app.state, "readiness", []):  # e.g. {"redis": "ok"}: never fails
        body.update(await part())
    return body


@router.get("/metrics", response_class=PlainTextResponse)
async def metrics(request: Request) -> PlainTextResponse:
    text = request.app.state.metrics.render(request.app.state.pool)
    return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")
