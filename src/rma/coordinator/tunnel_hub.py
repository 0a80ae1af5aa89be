"""The coordinator's end of worker tunnels: ``GET /api/worker/tunnel`` and an ``Upstream`` over it.

A worker behind NAT dials out and keeps one WebSocket open; the gateway's requests go back to it
as streams multiplexed over that connection (protocol: :mod:`rma.tunnel`).  A tunnel that dies
makes :meth:`TunnelHub.available` false at once; the worker's liveness status is the sweeper's
business, never changed here.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

import anyio
from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocket, WebSocketState

from rma.coordinator.errors import APIError, error_response
from rma.coordinator.gateway.upstream import UpstreamError, UpstreamRequest
from rma.coordinator.registry import WorkerState
from rma.schemas.enums import WorkerStatus
from rma.tunnel.frames import (
    MAX_DATA,
    SUBPROTOCOL,
    SUBPROTOCOLS,
    TUNNEL_PATH,
    FrameType,
    ProtocolError,
    end_to_end,
    headers_from_json,
)
from rma.tunnel.mux import Mux
from rma.tunnel.pipe import connect_head
from rma.tunnel.stream import Stream, StreamReset, TunnelClosed

if TYPE_CHECKING:
    from fastapi import FastAPI

    from rma.coordinator.pool import Pool

log = logging.getLogger("rma.coordinator.tunnel")

_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
_DROP_REQUEST = frozenset({"host", "content-length"})
#: WebSocket close code for a tunnel whose credential expired or was refused (policy violation).
CLOSE_CREDENTIAL = 1008


class _CredentialProblem(Exception):
    """The tunnel's credential expired, or a refresh was refused: close it (code 1008)."""


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
    __slots__ = (
        "close_code",
        "connected_at",
        "dead",
        "expires_at",
        "mux",
        "name",
        "protocol",
        "reason",
        "receive",
        "stop",
        "websocket",
        "worker_id",
    )

    def __init__(
        self,
        worker: WorkerState,
        websocket: WebSocket,
        receive: Receive,
        expires_at: float,
        protocol: str,
    ) -> None:
        self.worker_id = worker.id
        self.name = worker.name
        self.websocket = websocket
        #: The raw ASGI receive: the read loop skips Starlette's per-message wrapper.
        self.receive = receive
        self.mux: Mux
        self.connected_at = time.time()
        #: When the worker's credential expires (the pool's clock); a refresh moves it.
        self.expires_at = expires_at
        self.protocol = protocol
        #: Set from any thread to take the tunnel out of routing at once.
        self.dead = False
        self.reason = ""
        self.close_code = 1001
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
        self._emitting: set[asyncio.Future[Any]] = set()
        self.streams_opened = 0
        #: Called (on the loop) when a worker's tunnel attaches: the gateway lifts the marks
        #: its old transport earned, here and on the other coordinators.
        self.on_attach: list[Callable[[WorkerState], None]] = []
        pool.on_status_change.append(self._on_status_change)

    # --- Upstream ---------------------------------------------------------------------------------

    def available(self, worker: WorkerState) -> bool:
        tunnel = self._tunnels.get(worker.id)
        return tunnel is not None and tunnel.usable

    def _open_stream(self, worker: WorkerState) -> Stream:
        """A new stream on ``worker``'s tunnel; :class:`UpstreamError` (unreachable) without one.
        Raises :class:`TunnelClosed` when the tunnel is closing."""
        tunnel = self._tunnels.get(worker.id)
        if tunnel is None or not tunnel.usable:
            raise UpstreamError(
                f"worker {worker.name} has no tunnel connected", status=502, unreachable=True
            )
        stream = tunnel.mux.open_stream()
        self.streams_opened += 1
        return stream

    async def open(
        self, worker: WorkerState, request: UpstreamRequest, *, first_byte_timeout: float
    ) -> TunnelResponse:
        try:
            stream = self._open_stream(worker)
        except TunnelClosed as exc:
            raise UpstreamError(
                f"worker {worker.name}: tunnel closed: {exc}", status=502, unreachable=True
            ) from None
        body = request.body
        headers = end_to_end(request.headers, drop=_DROP_REQUEST)
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

    async def open_tcp(self, worker: WorkerState, service: str, *, limit: float) -> Stream:
        """A TCP connection to ``service`` on ``worker`` (``rma connect``), as a stream whose
        worker end is connected; raises :class:`UpstreamError` when it cannot be."""
        try:
            stream = self._open_stream(worker)
        except TunnelClosed as exc:
            raise UpstreamError(f"worker {worker.name}: tunnel closed: {exc}", status=502) from None
        try:
            await stream.send_head(FrameType.OPEN, connect_head(service), fin=False)
            async with asyncio.timeout(limit):
                answer = await stream.head()
            status = int(answer["status"])
        except TimeoutError:
            self._abort(stream, None, "timeout", "not connected in time")
            raise UpstreamError(
                f"worker {worker.name} did not connect to {service} within {limit:g} s",
                status=504,
                timeout=True,
            ) from None
        except (StreamReset, TunnelClosed) as exc:
            self._abort(stream, None, "cancelled", "")
            raise UpstreamError(f"worker {worker.name}: {exc}", status=502) from None
        except (KeyError, TypeError, ValueError) as exc:
            self._abort(stream, None, "protocol", f"bad answer: {exc}")
            raise UpstreamError(f"worker {worker.name}: bad answer: {exc}", status=502) from None
        except BaseException:
            self._abort(stream, None, "cancelled", "the client went away")
            raise
        if status != 200:
            self._abort(stream, None, "protocol", f"status {status}")
            raise UpstreamError(f"worker {worker.name} answered {status}", status=502)
        return stream

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
        # events still being written in threads finish before the database goes away
        while self._emitting:
            await asyncio.gather(*list(self._emitting), return_exceptions=True)

    # --- the WebSocket route ----------------------------------------------------------------------

    async def _authenticate(self, ws: WebSocket) -> tuple[WorkerState, float, str]:
        """Like ``require_worker``: 401 unless a valid worker credential, 403 for other keys.

        Returns the worker, its credential's expiry and the subprotocol to speak.
        """
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
        if secret.startswith(KEY_PREFIX) and await creds.find_key(secret):
            raise APIError(403, "a client key cannot open a worker tunnel", "forbidden")
        try:  # known here: no thread hop; else looked up (it joined another coordinator)
            state, expires_at = self.pool.authenticate_worker(secret)
        except APIError as exc:
            if exc.code != "unknown_worker":
                raise
            state, expires_at = await anyio.to_thread.run_sync(
                functools.partial(self.pool.authenticate_worker, secret, lookup=True)
            )
        if state.status is WorkerStatus.LEFT:
            raise APIError(409, "this worker has left; register again", "left")
        offered = ws.scope.get("subprotocols") or []
        protocol = next((p for p in SUBPROTOCOLS if p in offered), None)
        if protocol is None:
            raise APIError(
                400,
                f"this coordinator's tunnel speaks {SUBPROTOCOL}; the agent offered "
                f"{', '.join(offered) or 'none'} (upgrade rma on the worker)",
                "unsupported_protocol",
            )
        return state, expires_at, protocol

    def _refresh(self, tunnel: _Tunnel, payload: bytes) -> None:
        """A ``CREDENTIAL`` frame: the worker's renewed credential extends the tunnel's life."""
        try:
            state, expires_at = self.pool.authenticate_worker(payload.decode())
        except (APIError, UnicodeDecodeError) as exc:
            why = exc.message if isinstance(exc, APIError) else "not UTF-8"
            self._close_for_credential(tunnel, f"credential refresh refused: {why}")
            return
        if state.id != tunnel.worker_id:
            self._close_for_credential(
                tunnel, "credential refresh refused: the credential belongs to another worker"
            )
            return
        tunnel.expires_at = max(tunnel.expires_at, expires_at)

    @staticmethod
    def _close_for_credential(tunnel: _Tunnel, reason: str) -> None:
        tunnel.dead = True
        tunnel.reason = reason
        tunnel.close_code = CLOSE_CREDENTIAL
        tunnel.stop.set()

    async def serve(self, scope: Scope, receive: Receive, send: Send) -> None:
        """``GET /api/worker/tunnel`` (raw ASGI): authenticate, run the tunnel until it ends."""
        self._loop = asyncio.get_running_loop()
        ws = WebSocket(scope, receive, send)
        limiter = ws.app.state.auth_limiter
        addr = ws.client.host if ws.client else "unknown"
        try:
            state, expires_at, protocol = await self._authenticate(ws)
        except APIError as exc:
            if exc.status == 401:  # a valid credential is never refused for failures
                exc = limiter.refuse(limiter.buckets("worker", addr), exc)
            await _deny(ws, exc)
            return
        await ws.accept(subprotocol=protocol)

        async def send_frame(frame: bytes) -> None:  # straight to the server, one dict a frame
            await send({"type": "websocket.send", "bytes": frame})

        tunnel = _Tunnel(state, ws, receive, expires_at, protocol)
        mux = tunnel.mux = Mux(
            send_frame, on_credential=lambda payload: self._refresh(tunnel, payload)
        )
        old = self._tunnels.get(state.id)
        self._tunnels[state.id] = tunnel
        if old is not None:
            old.dead = True
            old.reason = "replaced by a newer tunnel from the same worker"
            old.stop.set()
        for hook in self.on_attach:
            try:
                hook(state)
            except Exception:
                log.exception("a tunnel_up hook failed for worker %s", state.name)
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
            return tunnel.reason or "closed by the coordinator", tunnel.close_code
        finished = reader if reader in done else pinger
        exc = finished.exception()
        if isinstance(exc, _CredentialProblem):
            return str(exc), CLOSE_CREDENTIAL
        if isinstance(exc, ProtocolError):
            return f"protocol error: {exc}", 1002
        if isinstance(exc, TunnelClosed):
            return str(exc), 1011
        if exc is not None:
            return f"{type(exc).__name__}: {exc}", 1011
        return finished.result(), 1000

    async def _read(self, tunnel: _Tunnel) -> str:
        receive, mux = tunnel.receive, tunnel.mux
        while True:
            message = await receive()
            if message["type"] != "websocket.receive":
                return f"the worker disconnected (code {message.get('code')})"
            data = message.get("bytes")
            if data is None:
                raise ProtocolError("text message on the tunnel")
            await mux.feed(data)

    async def _keepalive(self, tunnel: _Tunnel) -> str:
        """Ping every ``ping_interval``; end the tunnel when silent or its credential expired."""
        mux, clock = tunnel.mux, self.pool.clock
        next_ping = time.monotonic() + self.ping_interval
        while True:
            left = tunnel.expires_at - clock.time()
            if left <= 0:
                raise _CredentialProblem(
                    "the worker credential expired (the agent reconnects with its renewed one)"
                )
            await asyncio.sleep(max(0.0, min(next_ping - time.monotonic(), left)))
            now = time.monotonic()
            if now < next_ping:
                continue  # woke for the expiry check
            next_ping = now + self.ping_interval
            idle = now - mux.last_seen
            if idle > self.ping_timeout:
                return f"no frame from the worker for {idle:.0f} s"
            await mux.ping()

    def _emit(self, kind: str, message: str, worker_id: str) -> None:
        """Record an event without blocking the loop (database write in a thread; ``aclose``
        waits for the writes still running)."""
        try:
            loop = asyncio.get_running_loop()
            fut = loop.run_in_executor(None, self.pool.events.emit, kind, message, worker_id)
        except RuntimeError:  # the executor is shutting down
            return
        self._emitting.add(fut)
        fut.add_done_callback(self._emitting.discard)


class _Endpoint:
    def __init__(self, hub: TunnelHub) -> None:
        self.hub = hub

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.hub.serve(scope, receive, send)


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

    from starlette.routing import WebSocketRoute

    # A raw ASGI endpoint (not a function): Starlette passes scope, receive and send through,
    # so the tunnel's read and write loops talk to the server without per-message wrappers.
    app.router.routes.append(WebSocketRoute(TUNNEL_PATH, _Endpoint(hub), name="worker_tunnel"))
    app.state.tunnel_hub = hub
    app.state.on_shutdown.append(hub.aclose)
    app.state.stats_extensions.append(hub.stats)
    app.state.metrics.gauge(
        "rma_tunnels_connected",
        "Workers with a tunnel connected.",
        lambda: [((), float(len(hub.connected())))],
    )
    return hub
