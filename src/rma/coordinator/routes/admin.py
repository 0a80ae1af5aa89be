"""``/api/admin/*``: the operator's API (admin key)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse

from rma.coordinator.auth import AdminDep, PoolDep
from rma.coordinator.errors import APIError
from rma.coordinator.events import LiveFilter
from rma.schemas.api import (
    ApiKeyCreate,
    ApiKeyCreated,
    ApiKeyPublic,
    BackupPublic,
    CreditBalance,
    EventPublic,
    RestoreRequest,
    TokenCreate,
    TokenCreated,
    TokenPublic,
    WorkerPublic,
)
from rma.schemas.enums import WorkerStatus
from rma.schemas.since import parse_since

router = APIRouter(prefix="/api/admin", tags=["admin"])


@router.get("/workers")
def list_workers(
    _: AdminDep, pool: PoolDep, status: Annotated[WorkerStatus | None, Query()] = None
) -> list[WorkerPublic]:
    workers = sorted(pool.registry.all(), key=lambda w: (w.name, w.id))
    return [w.to_public() for w in workers if status is None or w.status is status]


@router.get("/workers/{worker_id}")
def get_worker(worker_id: str, _: AdminDep, pool: PoolDep) -> WorkerPublic:
    return pool.get(worker_id).to_public()


@router.delete("/workers/{worker_id}")
def remove_worker(worker_id: str, _: AdminDep, pool: PoolDep) -> WorkerPublic:
    return pool.remove(worker_id)


@router.post("/workers/{worker_id}/drain")
def drain_worker(worker_id: str, _: AdminDep, pool: PoolDep) -> WorkerPublic:
    return pool.drain(worker_id)


@router.post("/workers/{worker_id}/undrain")
def undrain_worker(worker_id: str, _: AdminDep, pool: PoolDep) -> WorkerPublic:
    return pool.undrain(worker_id)


@router.post("/workers/{worker_id}/trust")
def trust_worker(worker_id: str, _: AdminDep, pool: PoolDep) -> WorkerPublic:
    return pool.set_trusted(worker_id, True)


@router.post("/workers/{worker_id}/quarantine")
def quarantine_worker(worker_id: str, _: AdminDep, pool: PoolDep) -> WorkerPublic:
    return pool.set_quarantined(worker_id, True)


@router.post("/workers/{worker_id}/unquarantine")
def unquarantine_worker(worker_id: str, _: AdminDep, pool: PoolDep) -> WorkerPublic:
    return pool.set_quarantined(worker_id, False)


@router.post("/workers/{worker_id}/untrust")
def untrust_worker(worker_id: str, _: AdminDep, pool: PoolDep) -> WorkerPublic:
    return pool.set_trusted(worker_id, False)


@router.get("/tokens")
def list_tokens(_: AdminDep, pool: PoolDep) -> list[TokenPublic]:
    return pool.credentials.list_tokens()


@router.post("/tokens", status_code=201)
def create_token(body: TokenCreate, _: AdminDep, pool: PoolDep, request: Request) -> TokenCreated:
    from rma.pinning import certificate_file_hash, join_command

    created = pool.credentials.create_token(body.ttl, body.uses, body.label)
    pool.events.emit(
        "token_created", f"join token {created.id} created", data={"label": body.label}
    )
    cert = pool.settings.tls_cert
    created.ca_hash = certificate_file_hash(str(cert)) if cert else None
    # the URL donors use: the public one, else the one the operator reached this coordinator at
    url = pool.settings.public_url or str(request.base_url)
    created.join_command = join_command(url.rstrip("/"), created.token, created.ca_hash)
    return created


@router.delete("/tokens/{token_id}")
def revoke_token(token_id: str, _: AdminDep, pool: PoolDep) -> TokenPublic:
    revoked = pool.credentials.revoke_token(token_id)
    pool.events.emit("token_revoked", f"join token {token_id} revoked")
    return revoked


@router.get("/backups")
def list_backups(_: AdminDep, request: Request) -> list[BackupPublic]:
    """Every data-service backup kept, by service, newest first (``rma admin backups``)."""
    return list(request.app.state.backups.list())


@router.post("/backups/{service}/restore")
def restore_backup(
    service: str, body: RestoreRequest, _: AdminDep, pool: PoolDep, request: Request
) -> dict[str, Any]:
    """``rma admin restore``: the service's holder replaces its copy with a backup (the newest,
    or ``at``), told in its next heartbeat answer; its connections are cut meanwhile."""
    spec = pool.catalog.get(service)
    if spec is None or spec.backup is None:
        raise APIError(404, f"service {service!r} has no backup in the catalog", "not_found")
    info: BackupPublic | None = request.app.state.backups.get(service, body.at)
    if info is None:
        which = f"backup {body.at!r}" if body.at else "backup"
        raise APIError(404, f"no {which} of {service!r} (rma admin backups)", "no_backup")
    gateway = getattr(request.app.state, "gateway", None)
    if gateway is None:
        raise APIError(503, "this coordinator has no gateway", "unavailable")
    holder = gateway.data.holder(service)  # 503 no_worker when nobody holds it healthy
    pool.restores.setdefault(holder.id, {})[service] = info.id
    pool.events.emit(
        "restore_requested",
        f"{service} on worker {holder.name} restores backup {info.id}",
        holder.id,
        data={"service": service, "backup": info.id},
    )
    return {"service": service, "worker": holder.name, "backup": info.model_dump(mode="json")}


@router.get("/keys")
def list_keys(_: AdminDep, pool: PoolDep) -> list[ApiKeyPublic]:
    return pool.credentials.list_keys()


@router.post("/keys", status_code=201)
def create_key(body: ApiKeyCreate, _: AdminDep, pool: PoolDep) -> ApiKeyCreated:
    unknown = sorted(set(body.services or ()) - set(pool.catalog))
    if unknown:
        raise APIError(422, f"no service {', '.join(unknown)} in the catalog", "unknown_service")
    services = sorted(set(body.services)) if body.services else None
    created = pool.credentials.create_key(body.name, body.rpm, body.owner, services)
    data = {"name": body.name, "owner": body.owner, "services": services}
    pool.events.emit("key_created", f"API key {created.id} created", data=data)
    return created


@router.delete("/keys/{key_id}")
def revoke_key(key_id: str, _: AdminDep, pool: PoolDep) -> ApiKeyPublic:
    revoked = pool.credentials.revoke_key(key_id)
    pool.events.emit("key_revoked", f"API key {key_id} revoked")
    return revoked


@router.get("/credits")
def credits(
    _: AdminDep,
    pool: PoolDep,
    request: Request,
    by: Annotated[Literal["worker", "owner", "key"], Query()] = "worker",
    since: Annotated[
        str | None,
        Query(
            description="Only ledger rows written since then: an ISO-8601 timestamp (UTC "
            "without a zone) or a duration back from now (30m, 24h, 7d)."
        ),
    ] = None,
) -> list[CreditBalance]:
    """The credits ledger summed per worker, owner (the ``owner`` label) or client key."""
    start = None
    if since is not None:
        try:
            start = parse_since(since, time.time())
        except ValueError as exc:
            raise APIError(422, f"since: {exc}", "invalid_since") from None
    ledger = request.app.state.gateway.ledger
    rows = ledger.balances(by, pool.registry.all(), start)
    return [CreditBalance.model_validate(r) for r in rows]


@router.get("/stats")
def stats(_: AdminDep, pool: PoolDep, request: Request) -> dict[str, Any]:
    data = pool.stats()
    for extend in request.app.state.stats_extensions:
        data.update(extend())
    return data


@router.get("/services")
async def list_services(
    _: AdminDep,
    pool: PoolDep,
    request: Request,
    show_all: Annotated[
        bool,
        Query(
            alias="all",
            description="Also the data services that the pool neither holds nor could place.",
        ),
    ] = False,
) -> list[dict[str, Any]]:
    """Per catalog service: wanted, assigned and healthy replicas, in-flight and queued requests,
    and the last scaling event; data services also their holder, connections and last backup.

    A data service (``kind = "tcp"``) is listed only when the pool wants it somewhere: it is
    assigned or healthy on a worker, a live worker could run it, or the store keeps a backup of
    it (data that nobody holds now: an outage, shown as such).  A pool whose workers offer no
    database (a plain ``rma up``) lists none, rather than showing them as down.
    """
    gateway = getattr(request.app.state, "gateway", None)
    if gateway is None:
        return pool.services()
    balancer = gateway.balancer
    rows = pool.services(balancer.inflight_by_service(), balancer.queued_by_service())
    backups = request.app.state.backups.summary()
    candidates = pool.scheduler.last.candidates
    shown = []
    for row in rows:  # data services: where they live, connections open, the last backup
        spec = pool.catalog.get(row["name"])
        if spec is None or spec.kind != "tcp":
            shown.append(row)
            continue
        wanted = (
            row["assigned"] > 0
            or row["healthy"] > 0
            or candidates.get(spec.name, 0) > 0
            or spec.name in backups
        )
        if not (wanted or show_all):
            continue
        try:
            row["holder"] = gateway.data.holder(spec.name).name
        except APIError:
            row["holder"] = None
        row["connections"] = gateway.data.by_service.get(spec.name, 0)
        row["last_backup"] = backups.get(spec.name)
        shown.append(row)
    return shown


@router.post("/catalog/reload")
def reload_catalog(_: AdminDep, pool: PoolDep) -> dict[str, Any]:
    """Read the catalog files again; the scheduler places services by the new catalog at once
    and running workers get the new specs in their next heartbeat answer."""
    catalog = pool.reload_catalog()
    return {"services": sorted(catalog), "count": len(catalog)}


@router.get("/events", response_model=None)
async def events(
    _: AdminDep,
    pool: PoolDep,
    request: Request,
    follow: bool = False,
    since: Annotated[int | None, Query(ge=0)] = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 100,
) -> list[EventPublic] | StreamingResponse:
    import anyio

    if not follow:
        return await anyio.to_thread.run_sync(pool.events.recent, limit, since)
    # subscribe first, then read the backlog: an event in between is in one or both, and the
    # id check below drops the duplicates
    queue = pool.events.subscribe()
    try:
        backlog = await anyio.to_thread.run_sync(pool.events.recent, limit, since)
    except BaseException:
        pool.events.unsubscribe(queue)
        raise

    async def stream() -> AsyncIterator[bytes]:
        fresh = LiveFilter(backlog)
        try:
            for ev in backlog:
                yield _sse(ev)
            yield b": connected\n\n"
            while True:
                try:
                    ev = await asyncio.wait_for(queue.get(), timeout=15)
                except TimeoutError:
                    yield b": keep-alive\n\n"
                    continue
                if fresh(ev):
                    yield _sse(ev)
        finally:
            pool.events.unsubscribe(queue)

    return StreamingResponse(
        stream(),
        media_type="text/event-stream",
        headers={"cache-control": "no-cache", "x-accel-buffering": "no"},
    )


def _sse(ev: EventPublic) -> bytes:
    data = json.dumps(ev.model_dump(mode="json"))
    return f"id: {ev.id}\nevent: {ev.kind}\ndata: {data}\n\n".encode()


__all__ = ["APIError", "router"]
