"""The relay: a request for a tunnelled worker whose tunnel another coordinator holds.

A worker keeps one tunnel, to one coordinator; a client's request may reach any of them (a load
balancer in front).  The coordinator that holds no tunnel to the chosen worker sends the request,
as it would to a direct worker, to the one that does: ``ANY /api/internal/relay/{worker}/
{service}/{path}`` on that coordinator, which forwards it into the tunnel and streams the answer
back byte for byte.  Retries, cool-downs and the final SSE error work as for any upstream.

- **Where each tunnel is.** Every coordinator announces the workers whose tunnels it holds, with
  its own address (``internal_url``), every :data:`ANNOUNCE_EVERY` seconds (a ``tunnels`` notice
  on the change channel); the others remember each for :data:`TTL` seconds.  No table, no
  migration: the map is soft state, rebuilt within a second by a coordinator that (re)started.
- **Who may relay.** Only a coordinator of the pool: the ``x-rma-relay`` header carries a time
  and an HMAC-SHA256 of (time, method, target) under a key derived from the credential signing
  key, which every coordinator of the pool shares; older than :data:`MAX_SKEW` seconds or wrong:
  401.  Run the coordinators on a private network (or TLS): the relayed request itself is not
  encrypted by this.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import time
from collections.abc import AsyncIterator, Callable, MutableMapping
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import anyio
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from rma.coordinator.cluster.changes import Notice
from rma.coordinator.errors import APIError
from rma.coordinator.gateway.direct import DirectResponse, DirectUpstream
from rma.coordinator.gateway.upstream import UpstreamError, UpstreamRequest, UpstreamResponse
from rma.coordinator.registry import WorkerState
from rma.schemas.enums import Transport

if TYPE_CHECKING:
    from fastapi import FastAPI

    from rma.coordinator.cluster.node import Node
    from rma.coordinator.tunnel_hub import TunnelHub
    from rma.settings import CoordinatorSettings

log = logging.getLogger("rma.coordinator.cluster")

PREFIX = "/api/internal/relay"
HEADER = "x-rma-relay"
#: The notice kind that says which tunnels a coordinator holds.
TUNNELS = "tunnels"
#: Seconds between a coordinator's announcements of its tunnels, and how long one holds.
ANNOUNCE_EVERY = 1.0
TTL = 5.0
#: Worker ids per notice (a PostgreSQL notice payload holds at most 8000 bytes).
PER_NOTICE = 300
#: Seconds a relay signature stays valid (clocks of the coordinators may differ this much).
MAX_SKEW = 60.0
#: Headers that belong to one hop, never relayed.
_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        HEADER,
    }
)


def relay_url(settings: CoordinatorSettings) -> str:
    """Where the other coordinators reach this one (``internal_url``; default its own
    address, with 127.0.0.1 for a coordinator that listens on every address)."""
    if settings.internal_url:
        return settings.internal_url.rstrip("/")
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::", "") else settings.host
    return f"{settings.scheme}://{host}:{settings.port}"


def relay_key(signing_key: str) -> bytes:
    return hmac.new(signing_key.encode(), b"rma coordinator relay v1", hashlib.sha256).digest()


def sign(key: bytes, method: str, target: str, now: float) -> str:
    stamp = f"{now:.0f}"
    mac = hmac.new(key, f"{stamp}\n{method.upper()}\n{target}".encode(), hashlib.sha256)
    return f"{stamp}.{mac.hexdigest()}"


def signed(key: bytes, value: str, method: str, target: str, now: float) -> bool:
    stamp, _, _mac = value.partition(".")
    try:
        when = float(stamp)
    except ValueError:
        return False
    if abs(now - when) > MAX_SKEW:
        return False
    return hmac.compare_digest(value, sign(key, method, target, when))


class TunnelMap:
    """Worker id -> the address of the coordinator holding its tunnel (soft state)."""

    def __init__(self) -> None:
        self._at: dict[str, tuple[str, float]] = {}
        #: Told of the workers whose holder changed (or that were not known): their tunnel is
        #: new, and the cool-downs its old transport earned are lifted (``cooldowns``).
        self.on_move: list[Callable[[list[str]], None]] = []

    def where(self, worker_id: str) -> str | None:
        hit = self._at.get(worker_id)
        if hit is None or hit[1] < time.monotonic():
            return None
        return hit[0]

    def put(self, url: str, ids: list[str]) -> None:
        until = time.monotonic() + TTL
        moved: list[str] = []
        at = self._at
        for ident in ids:
            old = at.get(ident)
            if old is None or old[0] != url:
                moved.append(ident)
            at[ident] = (url, until)
        if moved:
            for hook in self.on_move:
                hook(moved)
        if len(self._at) > 4 * max(len(ids), 1000):  # forget what expired long ago
            now = time.monotonic()
            self._at = {k: v for k, v in self._at.items() if v[1] >= now}

    def take(self, notice: Notice) -> None:
        """A ``tunnels`` notice from another coordinator."""
        url, ids = notice.data.get("at"), notice.data.get("ids")
        if isinstance(url, str) and isinstance(ids, list):
            self.put(url, [str(i) for i in ids])


class RelayUpstream(DirectUpstream):
    """Reaches a tunnelled worker through the coordinator that holds its tunnel."""

    def __init__(
        self,
        hub: TunnelHub,
        tunnels: TunnelMap,
        key: Callable[[], bytes],
        own_url: str,
        connect_timeout: float,
    ) -> None:
        super().__init__(connect_timeout)
        self.hub = hub
        self.tunnels = tunnels
        self.key = key
        self.own_url = own_url
        #: Requests relayed so far (for tests and the stats).
        self.relayed = 0

    def available(self, worker: WorkerState) -> bool:
        if worker.transport is not Transport.TUNNEL or self.hub.available(worker):
            return False
        at = self.tunnels.where(worker.id)
        return at is not None and at != self.own_url

    async def open(
        self, worker: WorkerState, request: UpstreamRequest, *, first_byte_timeout: float
    ) -> DirectResponse:
        at = self.tunnels.where(worker.id)
        if at is None:
            raise UpstreamError(
                f"worker {worker.name}: no coordinator holds its tunnel", unreachable=True
            )
        target = f"{PREFIX}/{quote(worker.id, safe='')}/{quote(request.service, safe='')}"
        target += request.path if request.path.startswith("/") else "/" + request.path
        headers = [
            *request.headers,
            (HEADER, sign(self.key(), request.method, target, time.time())),
        ]
        self.relayed += 1
        return await self.send(
            at, request.method, target, headers, request.body, first_byte_timeout
        )


def _target(scope: MutableMapping[str, Any]) -> str:
    """The request target as sent (percent-encoding kept), with its query string."""
    raw: bytes = scope.get("raw_path") or str(scope["path"]).encode()
    query: bytes = scope.get("query_string") or b""
    return raw.decode("latin-1") + ("?" + query.decode("latin-1") if query else "")


async def _stream(resp: UpstreamResponse) -> AsyncIterator[bytes]:
    try:
        async for chunk in resp.aiter_bytes():
            yield chunk
    finally:
        await resp.aclose()


def relay_endpoint(
    app: FastAPI, hub: TunnelHub, key: Callable[[], bytes]
) -> Callable[[Request], Any]:
    pool = app.state.pool

    async def relay(request: Request) -> Response:
        target = _target(request.scope)
        if not signed(key(), request.headers.get(HEADER, ""), request.method, target, time.time()):
            raise APIError(
                401, "only a coordinator of this pool may relay (x-rma-relay)", "invalid_relay"
            )
        worker_id = request.path_params["worker_id"]
        service = request.path_params["service"]
        worker = pool.registry.get(worker_id)
        if worker is None or not hub.available(worker):
            raise APIError(
                502, f"this coordinator holds no tunnel of worker {worker_id}", "no_tunnel"
            )
        head = f"{PREFIX}/{quote(worker_id, safe='')}/{quote(service, safe='')}"
        inner = (
            target[len(head) :] if target.startswith(head) else "/" + request.path_params["path"]
        )
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in _HOP]
        body = await request.body()
        upstream = UpstreamRequest(service, request.method, inner or "/", headers, body)
        try:
            resp = await hub.open(
                worker, upstream, first_byte_timeout=pool.settings.first_byte_timeout
            )
        except UpstreamError as exc:
            status = 504 if exc.timeout else 502
            raise APIError(
                status, f"relay to worker {worker.name}: {exc}", "relay_failed"
            ) from None
        out = StreamingResponse(_stream(resp), status_code=resp.status)
        out.raw_headers = [
            (k.lower().encode("latin-1"), v.encode("latin-1"))
            for k, v in resp.headers
            if k.lower() not in _HOP
        ]
        return out

    return relay


async def announce_forever(hub: TunnelHub, node: Node, url: str) -> None:
    """Tell the other coordinators which tunnels this one holds (an app background task)."""
    while True:
        await asyncio.sleep(ANNOUNCE_EVERY)
        ids = hub.connected()
        if not ids or not node.connected:
            continue
        try:
            for i in range(0, len(ids), PER_NOTICE):
                chunk = ids[i : i + PER_NOTICE]
                await anyio.to_thread.run_sync(node.publish, TUNNELS, "", {"at": url, "ids": chunk})
        except Exception as exc:
            log.warning("could not announce this coordinator's tunnels: %s", exc)


def mount_relay(app: FastAPI, hub: TunnelHub) -> RelayUpstream:
    """The relay route, the upstream that uses the others', and the announcements."""
    from rma.coordinator.cluster.node import Node
    from rma.coordinator.gateway.openapi import SERVICE_METHODS

    pool = app.state.pool
    node = pool.cluster
    assert isinstance(node, Node)
    cache: dict[str, bytes] = {}

    def key() -> bytes:
        signing = pool.credentials.signing_key
        if signing not in cache:
            cache.clear()
            cache[signing] = relay_key(signing)
        return cache[signing]

    tunnels = TunnelMap()
    node.handlers[TUNNELS] = tunnels.take
    url = relay_url(pool.settings)
    upstream = RelayUpstream(hub, tunnels, key, url, pool.settings.connect_timeout)
    endpoint = relay_endpoint(app, hub, key)
    app.router.routes.append(
        Route(
            PREFIX + "/{worker_id}/{service}/{path:path}",
            endpoint,
            methods=SERVICE_METHODS,
            name="coordinator_relay",
        )
    )
    app.state.background.append(lambda: announce_forever(hub, node, url))
    app.state.on_shutdown.append(upstream.aclose)
    app.state.relay = upstream
    return upstream
