"""A small pooled HTTP/1.1 client on asyncio protocols and httptools.

Shared by the coordinator's direct transport (``rma.coordinator.gateway.direct``) and the agent's
tunnel (``rma.agent.tunnel``, which forwards tunnelled requests to the local service).

Why not httpx: its connection pool probes every pooled connection on every request (a ``select``
per connection, see httpcore's ``has_expired``), which cost ~7 ms of CPU per request at 32
concurrent connections here; this client costs a few tens of microseconds (see
docs/benchmarks.md).  It does what a reverse proxy needs and nothing else: keep-alive pooling per
origin, streamed response bodies with back-pressure, and errors that say whether anything of the
response had arrived.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import AsyncIterator
from functools import lru_cache
from typing import cast
from urllib.parse import urlsplit

import httptools

_FRAMING = ("content-length", "transfer-encoding")
#: Pause reading from a worker when this much of its answer waits for a slow client.
HIGH_WATER = 1 << 20
#: Largest response head accepted from a worker (names and values together).
MAX_HEADER_BYTES = 64 * 1024


class H1Error(Exception):
    """The connection failed.  ``before_response``: no byte of the response had arrived.

    ``unreachable``: no connection could be made at all (refused, no route): nothing listens.
    """

    def __init__(
        self,
        message: str,
        *,
        before_response: bool,
        timeout: bool = False,
        unreachable: bool = False,
    ) -> None:
        super().__init__(message)
        self.before_response = before_response
        self.timeout = timeout
        self.unreachable = unreachable


@lru_cache(maxsize=1024)
def parse_origin(base_url: str) -> tuple[str, str, int, str]:
    """``http://host:port/prefix`` -> (scheme, host, port, prefix without trailing slash)."""
    parts = urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {base_url!r}")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return parts.scheme, parts.hostname, port, parts.path.rstrip("/")


class _Connection(asyncio.Protocol):
    """One keep-alive connection; serves one request at a time."""

    def __init__(self, pool: H1Client, origin: tuple[str, str, int]) -> None:
        self.pool = pool
        self.origin = origin
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.reused = False
        self._reset()

    def _reset(self) -> None:
        self.status = 0
        self.headers: list[tuple[str, str]] = []
        self.header_bytes = 0
        self.interim = False
        self.chunks: deque[bytes] = deque()
        self.buffered = 0
        self.started = False  # a byte of the response arrived
        self.complete = False
        self.keep_alive = True
        self.framed = False  # content-length or chunked: else the body ends when the socket does
        self.error: H1Error | None = None
        self.head_waiter: asyncio.Future[None] | None = None
        self.body_waiter: asyncio.Future[None] | None = None
        self.paused = False

    # --- asyncio.Protocol -------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        self.started = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(H1Error(f"bad HTTP response: {exc}", before_response=not self.status))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool._forget(self)
        if self.status and not self.framed and exc is None and not self.complete:
            self.complete = True  # a body delimited by the end of the connection
            self.keep_alive = False
            _wake(self.body_waiter)
        if not self.complete:
            why = f"connection lost: {exc}" if exc else "connection closed by the worker"
            self._fail(H1Error(why, before_response=not self.started))

    def pause_writing(self) -> None:  # large request bodies: the kernel buffers the rest
        pass

    # --- httptools callbacks ----------------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        self.header_bytes += len(name) + len(value)
        if self.header_bytes > MAX_HEADER_BYTES:  # raised through feed_data: a bad response
            raise ValueError(f"response headers larger than {MAX_HEADER_BYTES} bytes")
        self.headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200:  # 100 Continue, 103 Early Hints: not the answer, wait for it
            self.interim = True
            self.headers = []
            self.header_bytes = 0
            return
        self.status = status
        self.keep_alive = self.parser.should_keep_alive()
        self.framed = any(k.lower() in _FRAMING for k, _ in self.headers)
        _wake(self.head_waiter)

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > HIGH_WATER and self.transport is not None and not self.paused:
            self.paused = True
            self.transport.pause_reading()
        _wake(self.body_waiter)

    def on_message_complete(self) -> None:
        if self.interim:
            self.interim = False
            return
        self.complete = True
        _wake(self.body_waiter)

    # --- use --------------------------------------------------------------------------------------

    def _fail(self, error: H1Error) -> None:
        if self.error is None:
            self.error = error
        _wake(self.head_waiter)
        _wake(self.body_waiter)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    async def request(self, head: bytes, body: bytes) -> None:
        """Send a request and wait for the response headers."""
        assert self.transport is not None
        self.transport.write(head + body if len(body) < 65536 else head)
        if len(body) >= 65536:
            self.transport.write(body)
        while not self.status:
            if self.error is not None:
                raise self.error
            self.head_waiter = asyncio.get_running_loop().create_future()
            try:
                await self.head_waiter
            finally:
                self.head_waiter = None

    def consumed(self, size: int) -> None:
        """``size`` buffered bytes were handed out: resume reading below the low-water mark."""
        self.buffered -= size
        if self.paused and self.buffered < HIGH_WATER // 2 and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()

    async def body(self) -> AsyncIterator[bytes]:
        while True:
            if self.chunks:
                chunk = self.chunks.popleft()
                self.consumed(len(chunk))
                yield chunk
                continue
            if self.complete:
                return
            if self.error is not None:
                raise self.error
            self.body_waiter = asyncio.get_running_loop().create_future()
            try:
                await self.body_waiter
            finally:
                self.body_waiter = None

    def release(self) -> None:
        """Back to the pool when the exchange finished cleanly; closed otherwise."""
        if self.complete and self.keep_alive and self.error is None and not self.closed:
            self._reset()
            self.reused = True
            self.pool._put(self)
        else:
            self.close()


def _wake(fut: asyncio.Future[None] | None) -> None:
    if fut is not None and not fut.done():
        fut.set_result(None)


class H1Response:
    """A response whose headers arrived; iterate :meth:`aiter_bytes`, then :meth:`aclose`."""

    __slots__ = ("_conn", "_done", "headers", "status")

    def __init__(self, conn: _Connection) -> None:
        self._conn = conn
        self.status = conn.status
        self.headers = conn.headers
        self._done = False

    def aiter_bytes(self) -> AsyncIterator[bytes]:
        return self._conn.body()

    @property
    def at_end(self) -> bool:
        """The whole body arrived and was handed out (nothing more will come)."""
        return self._conn.complete and not self._conn.chunks

    def take_buffered(self, limit: int) -> bytes:
        """Body bytes that already arrived, whole chunks up to ``limit`` bytes, without waiting.

        Lets a proxy send the head and the start (often all) of a small body in one message.
        """
        conn = self._conn
        parts: list[bytes] = []
        size = 0
        while conn.chunks and size + len(conn.chunks[0]) <= limit:
            chunk = conn.chunks.popleft()
            parts.append(chunk)
            size += len(chunk)
        if parts:
            conn.consumed(size)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def aclose(self) -> None:
        if not self._done:
            self._done = True
            self._conn.release()


class H1Client:
    def __init__(self, connect_timeout: float, max_idle_per_origin: int = 512) -> None:
        self.connect_timeout = connect_timeout
        self.max_idle = max_idle_per_origin
        self._idle: dict[tuple[str, str, int], list[_Connection]] = {}
        self._all: set[_Connection] = set()
        self._ssl: ssl.SSLContext | None = None

    def _put(self, conn: _Connection) -> None:
        idle = self._idle.setdefault(conn.origin, [])
        if len(idle) >= self.max_idle:
            conn.close()
        else:
            idle.append(conn)

    def _forget(self, conn: _Connection) -> None:
        self._all.discard(conn)
        idle = self._idle.get(conn.origin)
        if idle and conn in idle:
            idle.remove(conn)

    async def _connect(self, origin: tuple[str, str, int]) -> _Connection:
        scheme, host, port = origin
        loop = asyncio.get_running_loop()
        context = None
        if scheme == "https":
            self._ssl = self._ssl or ssl.create_default_context()
            context = self._ssl
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, proto = await loop.create_connection(
                    lambda: _Connection(self, origin), host, port, ssl=context
                )
        except TimeoutError:
            raise H1Error(
                f"could not connect to {host}:{port} within {self.connect_timeout:g} s",
                before_response=True,
                timeout=True,
            ) from None
        except OSError as exc:
            raise H1Error(
                f"could not connect to {host}:{port}: {exc.strerror or exc}",
                before_response=True,
                unreachable=True,
            ) from None
        self._all.add(proto)
        return proto

    async def send(
        self, method: str, base_url: str, path: str, headers: list[tuple[str, str]], body: bytes
    ) -> H1Response:
        """Send one request; return once the response headers are in.

        Raises :class:`H1Error` (``before_response`` tells whether it is safe to retry).
        """
        scheme, host, port, prefix = parse_origin(base_url)
        origin = (scheme, host, port)
        default_port = 443 if scheme == "https" else 80
        host_header = host if port == default_port else f"{host}:{port}"
        lines = [f"{method} {prefix}{path} HTTP/1.1\r\nhost: {host_header}\r\n"]
        lines += [f"{k}: {v}\r\n" for k, v in headers]
        if body or method not in ("GET", "HEAD", "DELETE", "OPTIONS"):
            lines.append(f"content-length: {len(body)}\r\n")
        lines.append("\r\n")
        head = "".join(lines).encode("latin-1")
        idle = self._idle.get(origin)
        while idle:
            conn = idle.pop()
            if conn.closed:
                continue
            try:
                await conn.request(head, body)
            except H1Error as exc:
                conn.close()
                if exc.before_response:
                    break  # a stale keep-alive connection: try a fresh one below
                raise
            except BaseException:  # cancelled (first-byte timeout): the connection is spent
                conn.close()
                raise
            return self._response(conn, method)
        conn = await self._connect(origin)
        try:
            await conn.request(head, body)
        except BaseException:
            conn.close()
            raise
        return self._response(conn, method)

    @staticmethod
    def _response(conn: _Connection, method: str) -> H1Response:
        if method == "HEAD" and not conn.complete:
            conn.complete = True  # no body follows; the parser does not know the method
            conn.keep_alive = False
        return H1Response(conn)

    async def aclose(self) -> None:
        for conn in list(self._all):
            conn.close()
        self._idle.clear()
        self._all.clear()
