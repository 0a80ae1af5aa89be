"""The coordinator's end of worker tunnels: ``GET /api/worker/tunnel`` and an ``Upstream`` over it.

A worker behind NAT dials out and keeps one WebSocket open; the gateway's requests go back to it
as streams multiplexed over that connection (protocol: :mod:`rma.tunnel`).  A tunnel that dies
makes :meth:`TunnelHub.available` false at once; the worker's liveness status is the sweeper's
business, never changed here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from starlette.websockets import WebSocket, WebSocketState

from rma.coordinator.errors import APIError, error_response
from rma.coordinator.gateway.upstream import UpstreamError, UpstreamRequest
from rma.coordinator.registry import WorkerState
from rma.schemas.enums import WorkerStatus
from rma.tunnel.frames import (
    MAX_DATA,
    SUBPROTOCOL,
    TUNNEL_PATH,
    FrameType,
    ProtocolError,
    end_to_end,
    headers_from_json,
)
from rma.tunnel.mux import Mux
from rma.tunnel.stream import Stream, StreamReset, TunnelClosed

if TYPE_CHECKING:
    from fastapi import FastAPI

    from rma.coordinator.pool import Pool

log = logging.getLogger("rma.coordinator.tunnel")

_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


class TunnelResponse:
    """A response coming back through a tunnel (an ``UpstreamResponse``)."""

    def __init__(
        self,
        stream: Stream,
        status: int,
        headers: list[tuple[str, str]],
        worker_name: str,
        body_task: asyncio.Task[None] | None,
    ) -> None:
        self.status = status
        self.headers = headers
        self._stream = stream
        self._worker = worker_name
        self._body_task = body_task

    async def aiter_bytes(self) -> AsyncIterator[bytes]:
        while True:
            try:
                chunk = await self._stream.read()
            except (StreamReset, TunnelClosed) as exc:
                raise UpstreamError(
                    f"worker {self._worker}: the stream broke: {exc}", retryable=False, status=502
                ) from None
            if chunk is None:
                return
            yield chunk

    async def aclose(self) -> None:
        """Stop: a response not read to its end is cancelled on the worker too."""
        if self._body_task is not None:
            self._body_task.cancel()
        await self._stream.reset("cancelled", "the client went away")


class _Tunnel:
    __slots__ = ("connected_at", "dead", "mux", "name", "reason", "stop", "websocket", "worker_id")

    def __init__(self, worker: WorkerState, websocket: WebSocket, mux: Mux) -> None:
        self.worker_id = worker.id
        self.name = worker.name
        self.websocket = websocket
        self.mux = mux
        self.connected_at = time.time()
        #: Set from any thread to take the tunnel out of routing at once.
        self.dead = False
        self.reason = ""
        self.stop = asyncio.Event()

    @property
    def usable(self) -> bool:
        return not self.dead and not self.mux.closed


class TunnelHub:
    """Every connected worker tunnel; an ``Upstream`` for workers whose transport is ``tunnel``."""

    def __init__(
        self, pool: Pool, *, ping_interval: float = 15.0, ping_timeout: float = 45.0
    ) -> None:
        self.pool = pool
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self._tunnels: dict[str, _Tunnel] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._aborts: set[asyncio.Task[None]] = set()
        self.streams_opened = 0
        pool.on_status_change.append(self._on_status_change)

    # --- Upstream ---------------------------------------------------------------------------------

    def available(self, worker: WorkerState) -> bool:
        tunnel = self._tunnels.get(worker.id)
        return tunnel is not None and tunnel.usable

    async def open(
        self, worker: WorkerState, request: UpstreamRequest, *, first_byte_timeout: float
    ) -> TunnelResponse:
        tunnel = self._tunnels.get(worker.id)
        if tunnel is None or not tunnel.usable:
            raise UpstreamError(f"worker {worker.name} has no tunnel connected", status=502)
        try:
            stream = tunnel.mux.open_stream()
        except TunnelClosed as exc:
            raise UpstreamError(f"worker {worker.name}: tunnel closed: {exc}", status=502) from None
        self.streams_opened += 1
        body = request.body
        headers = end_to_end(request.headers, drop=frozenset({"host", "content-length"}))
        if body or request.method.upper() in _BODY_METHODS:
            headers.append(("content-length", str(len(body))))
        head = {
            "service": request.service,
            "method": request.method,
            "path": request.path,
            "headers": [[k, v] for k, v in headers],
        }
        body_task: asyncio.Task[None] | None = None
        try:
            inline, rest = body[:MAX_DATA], body[MAX_DATA:]
            await stream.send_head(FrameType.OPEN, head, inline, fin=not rest)
            if rest:
                body_task = asyncio.create_task(_send_body(stream, rest))
            async with asyncio.timeout(first_byte_timeout):
                answer = await stream.head()
            status = int(answer["status"])
            resp_headers = headers_from_json(answer["headers"])
        except TimeoutError:
            self._abort(stream, body_task, "timeout", "no response head in time")
            raise UpstreamError(
                f"worker {worker.name} sent no response head within {first_byte_timeout:g} s",
                status=504,
                timeout=True,
            ) from None
        except StreamReset as exc:
            self._abort(stream, body_task, "cancelled", "")
            raise UpstreamError(f"worker {worker.name}: {exc}", status=502) from None
        except TunnelClosed as exc:
            self._abort(stream, body_task, "cancelled", "")
            raise UpstreamError(f"worker {worker.name}: tunnel closed: {exc}", status=502) from None
        except (KeyError, TypeError, ValueError, ProtocolError) as exc:
            self._abort(stream, body_task, "protocol", f"bad response head: {exc}")
            raise UpstreamError(
                f"worker {worker.name}: bad response head: {exc}", status=502
            ) from None
        except BaseException:  # cancelled: the client went away while we waited
            self._abort(stream, body_task, "cancelled", "the client went away")
            raise
        return TunnelResponse(stream, status, resp_headers, worker.name, body_task)

    def _abort(
        self, stream: Stream, body_task: asyncio.Task[None] | None, code: str, message: str
    ) -> None:
        """Reset ``stream`` without awaiting (usable while being cancelled)."""
        if body_task is not None:
            body_task.cancel()
        task = asyncio.get_running_loop().create_task(stream.reset(code, message))
        self._aborts.add(task)
        task.add_done_callback(self._aborts.discard)

    # --- state ------------------------------------------------------------------------------------

    def connected(self) -> list[str]:
        """Ids of workers with a usable tunnel."""
        return [wid for wid, t in list(self._tunnels.items()) if t.usable]

    def stats(self) -> dict[str, Any]:
        tunnels = [t for t in list(self._tunnels.values()) if t.usable]
        return {
            "tunnels": len(tunnels),
            "tunnel_streams": sum(len(t.mux.streams) for t in tunnels),
        }

    def disconnect(self, worker_id: str, reason: str) -> None:
        """Close a worker's tunnel; callable from any thread.  Routing stops using it at once."""
        tunnel = self._tunnels.get(worker_id)
        if tunnel is None:
            return
        tunnel.dead = True
        tunnel.reason = reason
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(tunnel.stop.set)

    def _on_status_change(self, state: WorkerState) -> None:
        # ``left`` keeps its tunnel: the agent lets in-flight requests finish, then closes it.
        if state.status is WorkerStatus.REMOVED:
            self.disconnect(state.id, "the worker was removed by the operator")

    async def aclose(self) -> None:
        for worker_id in list(self._tunnels):
            self.disconnect(worker_id, "the coordinator is shutting down")

    # --- the WebSocket route ----------------------------------------------------------------------

    def _authenticate(self, ws: WebSocket) -> WorkerState:
        """Like ``require_worker``: 401 unless a valid worker credential, 403 for other keys."""
        from rma.coordinator.security import KEY_PREFIX

        scheme, _, value = ws.headers.get("authorization", "").partition(" ")
        secret = value.strip()
        if scheme.lower() != "bearer" or not secret:
            raise APIError(
                401,
                "worker credential required (Authorization: Bearer <credential>)",
                headers={"WWW-Authenticate": "Bearer"},
            )
        creds = self.pool.credentials
        if creds.is_admin(secret):
            raise APIError(403, "an admin key cannot open a worker tunnel", "forbidden")
        if secret.startswith(KEY_PREFIX) and creds.check_key(secret):
            raise APIError(403, "a client key cannot open a worker tunnel", "forbidden")
        state, _ = self.pool.authenticate_worker(secret)
        if state.status is WorkerStatus.LEFT:
            raise APIError(409, "this worker has left; register again", "left")
        offered = ws.scope.get("subprotocols") or []
        if SUBPROTOCOL not in offered:
            raise APIError(
                400,
                f"this coordinator's tunnel speaks {SUBPROTOCOL}; the agent offered "
                f"{', '.join(offered) or 'none'} (upgrade rma on the worker)",
                "unsupported_protocol",
            )
        return state

    async def serve(self, ws: WebSocket) -> None:
        """``GET /api/worker/tunnel``: authenticate, then run the tunnel until it ends."""
        self._loop = asyncio.get_running_loop()
        limiter = ws.app.state.auth_limiter
        addr = ws.client.host if ws.client else "unknown"
        try:
            limiter.check(addr)
            state = self._authenticate(ws)
        except APIError as exc:
            if exc.status == 401:
                limiter.fail(addr)
            await _deny(ws, exc)
            return
        await ws.accept(subprotocol=SUBPROTOCOL)
        mux = Mux(ws.send_bytes)
        tunnel = _Tunnel(state, ws, mux)
        old = self._tunnels.get(state.id)
        self._tunnels[state.id] = tunnel
        if old is not None:
            old.dead = True
            old.reason = "replaced by a newer tunnel from the same worker"
            old.stop.set()
        self._emit("tunnel_up", f"worker {state.name} connected its tunnel", state.id)
        reason = "closed"
        code = 1000
        try:
            reason, code = await self._run(tunnel)
        finally:
            tunnel.dead = True
            mux.close(reason)
            if self._tunnels.get(state.id) is tunnel:
                del self._tunnels[state.id]
            self._emit("tunnel_down", f"worker {state.name} tunnel closed: {reason}", state.id)
            log.info("tunnel of worker %s closed: %s", state.name, reason)
            if ws.application_state is WebSocketState.CONNECTED:
                with contextlib.suppress(Exception):
                    await ws.close(code, reason[:120])

    async def _run(self, tunnel: _Tunnel) -> tuple[str, int]:
        reader = asyncio.create_task(self._read(tunnel))
        pinger = asyncio.create_task(self._keepalive(tunnel))
        stopper = asyncio.create_task(tunnel.stop.wait())
        tasks = {reader, pinger, stopper}
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        if stopper in done:
            return tunnel.reason or "closed by the coordinator", 1001
        finished = reader if reader in done else pinger
        exc = finished.exception()
        if isinstance(exc, ProtocolError):
            return f"protocol error: {exc}", 1002
        if isinstance(exc, TunnelClosed):
            return str(exc), 1011
        if exc is not None:
            return f"{type(exc).__name__}: {exc}", 1011
        return finished.result(), 1000

    async def _read(self, tunnel: _Tunnel) -> str:
        ws, mux = tunnel.websocket, tunnel.mux
        while True:
            message = await ws.receive()
            if message["type"] == "websocket.disconnect":
                return f"the worker disconnected (code {message.get('code')})"
            data = message.get("bytes")
            if data is None:
                raise ProtocolError("text message on the tunnel")
            await mux.feed(data)

    async def _keepalive(self, tunnel: _Tunnel) -> str:
        mux = tunnel.mux
        while True:
            await asyncio.sleep(self.ping_interval)
            idle = time.monotonic() - mux.last_seen
            if idle > self.ping_timeout:
                return f"no frame from the worker for {idle:.0f} s"
            await mux.ping()

    def _emit(self, kind: str, message: str, worker_id: str) -> None:
        """Record an event without blocking the loop (database write in a thread)."""
        try:
            loop = asyncio.get_running_loop()
            loop.run_in_executor(None, self.pool.events.emit, kind, message, worker_id)
        except RuntimeError:  # the executor is shutting down
            pass


async def _send_body(stream: Stream, body: bytes) -> None:
    with contextlib.suppress(StreamReset, TunnelClosed):
        await stream.write(body, fin=True)


async def _deny(ws: WebSocket, exc: APIError) -> None:
    """Refuse the handshake with a JSON error and the right HTTP status."""
    if "websocket.http.response" in ws.scope.get("extensions", {}):
        await ws.send_denial_response(
            error_response(exc.status, exc.code, exc.message, exc.headers)
        )
    else:
        await ws.close(code=1008, reason=exc.message[:120])


def mount_tunnel(app: FastAPI) -> TunnelHub:
    """Add ``GET /api/worker/tunnel`` to ``app``; the hub goes to ``app.state.tunnel_hub``."""
    existing: TunnelHub | None = getattr(app.state, "tunnel_hub", None)
    if existing is not None:
        return existing
    pool: Pool = app.state.pool
    settings = pool.settings
    hub = TunnelHub(
        pool,
        ping_interval=settings.tunnel_ping_interval,
        ping_timeout=settings.tunnel_ping_timeout,
    )

    async def worker_tunnel(websocket: WebSocket) -> None:
        await hub.serve(websocket)

    app.add_api_websocket_route(TUNNEL_PATH, worker_tunnel, name="worker_tunnel")
    app.state.tunnel_hub = hub
    app.state.on_shutdown.append(hub.aclose)
    app.state.stats_extensions.append(hub.stats)
    app.state.metrics.gauge(
        "rma_tunnels_connected",
        "Workers with a tunnel connected.",
        lambda: [((), float(len(hub.connected())))],
    )
    return hub
