"""``GET /api/services/{service}/connect``: a TCP connection to a data service, over a WebSocket.

The client (``rma connect`` or any program) opens a WebSocket with its API key as Bearer.  The
coordinator checks the key, the service (in the catalog, ``kind = "tcp"``), the key's limits, and
picks the service's holder (the longest-registered healthy worker that runs it: with several
copies, each is its own database, so every connection goes to the same one while it lives).  It
then connects to the service on that worker, through the worker's tunnel (a stream: see
:mod:`rma.tunnel.pipe`) or, for a direct worker, a TCP connection to the endpoint it reported
(checked against SSRF at heartbeat).  Only then is the WebSocket accepted: every refusal is an
HTTP answer ``{"error": {...}}`` with its status.

After that, binary messages carry the bytes each way, unchanged.  The coordinator closes with
1000 when the service ended the connection, 1011 when the worker or its tunnel failed, 1003 for a
text message and 1009 for a message over ``connect_max_message_bytes``.  ``?check=1`` checks
everything but the connection itself, and answers one text message ``{service, worker,
connect_url}`` before closing (``rma connect`` does this before it listens).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import TYPE_CHECKING, Protocol
from urllib.parse import parse_qs, urlsplit

from starlette.types import Message, Receive, Scope, Send
from starlette.websockets import WebSocket

from rma.coordinator.credentials import KeyInfo
from rma.coordinator.errors import APIError, error_response
from rma.coordinator.gateway.upstream import UpstreamError
from rma.coordinator.registry import WorkerState
from rma.schemas.api import ServiceSpec
from rma.tunnel.frames import MAX_DATA
from rma.tunnel.stream import Stream, StreamReset, TunnelClosed

if TYPE_CHECKING:
    from rma.coordinator.gateway.proxy import Gateway

log = logging.getLogger("rma.gateway.connect")

CONNECT_PATH = "/api/services/{service}/connect"
#: Seconds the service gets to finish after the client closed (then the connection is cut).
CLOSE_GRACE = 5.0


class _Close(Exception):
    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class _Broken(Exception):
    """The worker's end failed (socket error, stream reset, tunnel gone)."""


class Conn(Protocol):
    async def read(self) -> bytes | None: ...
    async def write(self, data: bytes) -> None: ...
    async def write_eof(self) -> None: ...
    async def close(self) -> None: ...


class StreamConn:
    """The worker's end through its tunnel."""

    def __init__(self, stream: Stream) -> None:
        self.stream = stream

    async def read(self) -> bytes | None:
        try:
            return await self.stream.read()
        except (StreamReset, TunnelClosed) as exc:
            raise _Broken(str(exc)) from None

    async def write(self, data: bytes) -> None:
        try:
            await self.stream.write(data)
        except (StreamReset, TunnelClosed) as exc:
            raise _Broken(str(exc)) from None

    async def write_eof(self) -> None:
        with contextlib.suppress(StreamReset, TunnelClosed):
            await self.stream.write(b"", fin=True)

    async def close(self) -> None:
        if not self.stream.finished:
            await self.stream.reset("cancelled", "the client's connection ended")


class SocketConn:
    """The worker's end over a direct TCP connection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def read(self) -> bytes | None:
        try:
            return await self.reader.read(MAX_DATA) or None
        except OSError as exc:
            raise _Broken(f"{type(exc).__name__}: {exc}") from None

    async def write(self, data: bytes) -> None:
        try:
            self.writer.write(data)
            await self.writer.drain()
        except OSError as exc:
            raise _Broken(f"{type(exc).__name__}: {exc}") from None

    async def write_eof(self) -> None:
        if self.writer.can_write_eof():
            with contextlib.suppress(OSError):
                self.writer.write_eof()

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


def connection_string(spec: ServiceSpec, host: str, port: int) -> str | None:
    """The catalog's ``connect_url`` for a local forwarder on ``host:port``."""
    if not spec.connect_url:
        return None
    return spec.connect_url.replace("{host}", host).replace("{port}", str(port))


class DataConnections:
    """The route, its limits and the connections open now (raw ASGI WebSocket endpoint)."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        s = gateway.settings
        self.max_per_key = s.connect_max_per_key
        self.max_total = s.connect_max_connections
        self.max_message = s.connect_max_message_bytes
        self.timeout = s.connect_timeout
        self.by_key: dict[str, int] = {}
        self.by_service: dict[str, int] = {}
        self.opened = 0

    @property
    def active(self) -> int:
        return sum(self.by_key.values())

    # --- admission --------------------------------------------------------------------------------

    async def _key(self, scope: Scope) -> KeyInfo:
        key = await self.gateway.authenticate(scope)
        if key is None:  # anonymous clients are for HTTP services; a database needs a key
            raise APIError(
                401,
                "a data service needs an API key (Authorization: Bearer <key>; "
                "rma admin keys create)",
                "missing_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )
        return key

    def _spec(self, name: str) -> ServiceSpec:
        spec = self.gateway.pool.catalog.get(name)
        if spec is None:
            raise APIError(404, f"no service {name!r} in the catalog", "unknown_service")
        if spec.kind != "tcp":
            raise APIError(
                400,
                f"service {name!r} is not a TCP service (kind {spec.kind!r}): reach it over "
                f"HTTP under /api/services/{name}/ or /v1",
                "not_tcp_service",
            )
        return spec

    def holder(self, service: str) -> WorkerState:
        """The worker a new connection goes to: the longest-registered healthy holder."""
        workers = self.gateway.balancer.workers_for(service)
        if not workers:
            raise APIError(
                503,
                f"no worker is running service {service!r} healthy right now; try again later",
                "no_worker",
                headers={"Retry-After": "5"},
            )
        return min(workers, key=lambda w: (w.registered_at, w.id))

    def _reserve(self, key: KeyInfo, service: str) -> None:
        held = self.by_key.get(key.id, 0)
        if held >= self.max_per_key:
            raise APIError(
                429,
                f"this API key has {held} data connections open, the most allowed "
                f"(connect_max_per_key); close one first",
                "too_many_connections",
                headers={"Retry-After": "1"},
            )
        if self.active >= self.max_total:
            raise APIError(
                503,
                f"the coordinator carries {self.active} data connections, its most "
                "(connect_max_connections); try again later",
                "saturated",
                headers={"Retry-After": "1"},
            )
        self.by_key[key.id] = held + 1
        self.by_service[service] = self.by_service.get(service, 0) + 1

    def _release(self, key: KeyInfo, service: str) -> None:
        for table, name in ((self.by_key, key.id), (self.by_service, service)):
            left = table.get(name, 0) - 1
            if left > 0:
                table[name] = left
            else:
                table.pop(name, None)

    async def _open(self, worker: WorkerState, service: str) -> Conn:
        from rma.coordinator.gateway.direct import DirectUpstream
        from rma.coordinator.tunnel_hub import TunnelHub

        upstream = self.gateway.upstream_for(worker)
        try:
            if isinstance(upstream, TunnelHub):
                return StreamConn(await upstream.open_tcp(worker, service, limit=self.timeout))
            if isinstance(upstream, DirectUpstream):
                return await self._open_direct(worker, service)
        except UpstreamError as exc:
            if exc.unreachable:
                self.gateway.balancer.mark_unreachable(worker)
            status = 504 if exc.timeout else 502
            raise APIError(
                status, f"service {service!r} on worker {worker.name}: {exc}", "upstream_failed"
            ) from None
        raise APIError(502, f"no transport reaches worker {worker.name}", "upstream_failed")

    async def _open_direct(self, worker: WorkerState, service: str) -> Conn:
        from rma.coordinator.gateway.direct import DirectUpstream

        base = DirectUpstream.base_url(worker, service)
        parts = urlsplit(base or "")
        if not parts.hostname or not parts.port:
            raise UpstreamError(f"worker {worker.name} reported no endpoint for {service}")
        try:
            async with asyncio.timeout(self.timeout):
                reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
        except TimeoutError:
            raise UpstreamError(f"no connection within {self.timeout:g} s", timeout=True) from None
        except OSError as exc:
            raise UpstreamError(f"{type(exc).__name__}: {exc}", unreachable=True) from None
        return SocketConn(reader, writer)

    # --- the endpoint -----------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        ws = WebSocket(scope, receive, send)
        name = str(scope.get("path_params", {}).get("service", ""))
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        check = query.get("check", [""])[0].lower() in ("1", "true", "yes")
        try:
            key = await self._key(scope)
            spec = self._spec(name)
            if not key.allows(name, data=True):
                raise APIError(
                    403,
                    f"this API key may not connect to {name!r}: a data service needs a key "
                    f"that names it (rma admin keys create --services {name})",
                    "service_not_allowed",
                )
            await self.gateway.limiter.acquire(key.id, key.rpm)
            worker = self.holder(name)
        except APIError as exc:
            await deny(ws, exc)
            return
        if check:
            await ws.accept()
            info = {"service": name, "worker": worker.name, "connect_url": spec.connect_url}
            await ws.send_text(json.dumps(info))
            await ws.close(1000)
            return
        try:
            self._reserve(key, name)
        except APIError as exc:
            await deny(ws, exc)
            return
        try:
            try:
                conn = await self._open(worker, name)
            except APIError as exc:
                await deny(ws, exc)
                return
            self.opened += 1
            try:
                await ws.accept()
                code, reason = await self._pump(conn, receive, send)
            finally:
                await conn.close()
            with contextlib.suppress(Exception):
                await send({"type": "websocket.close", "code": code, "reason": reason[:120]})
        finally:
            self._release(key, name)

    async def _pump(self, conn: Conn, receive: Receive, send: Send) -> tuple[int, str]:
        """Copy until one side ends; returns the WebSocket close code and reason."""

        async def from_client() -> str:
            while True:
                message: Message = await receive()
                kind = message["type"]
                if kind == "websocket.disconnect":
                    return "client"
                if kind != "websocket.receive":
                    continue
                data = message.get("bytes")
                if data is None:
                    raise _Close(1003, "text messages are not part of the stream")
                if len(data) > self.max_message:
                    raise _Close(1009, f"messages are limited to {self.max_message} bytes")
                if data:
                    await conn.write(data)

        async def to_client() -> str:
            while (chunk := await conn.read()) is not None:
                await send({"type": "websocket.send", "bytes": chunk})
            return "service"

        up = asyncio.create_task(from_client())
        down = asyncio.create_task(to_client())
        try:
            done, _ = await asyncio.wait((up, down), return_when=asyncio.FIRST_COMPLETED)
            first = up if up in done else down
            exc = first.exception()
            if isinstance(exc, _Close):
                return exc.code, exc.reason
            if isinstance(exc, _Broken):
                return 1011, f"the service's connection broke: {exc}"
            if exc is not None:
                log.warning("data connection failed: %s: %s", type(exc).__name__, exc)
                return 1011, f"{type(exc).__name__}"
            if first is up:  # the client went away: let the service see the end, briefly
                await conn.write_eof()
                with contextlib.suppress(Exception):  # a timeout, or nobody left to send to
                    async with asyncio.timeout(CLOSE_GRACE):
                        await down
                return 1000, "client closed"
            return 1000, "the service closed the connection"
        finally:
            for task in (up, down):
                task.cancel()
            for task in (up, down):
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task


async def deny(ws: WebSocket, exc: APIError) -> None:
    """Refuse the handshake with a JSON error and the right HTTP status."""
    if "websocket.http.response" in ws.scope.get("extensions", {}):
        await ws.send_denial_response(
            error_response(exc.status, exc.code, exc.message, exc.headers)
        )
    else:
        await ws.close(code=1008, reason=exc.message[:120])
