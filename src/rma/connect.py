"""``rma connect``'s forwarder: a local TCP port whose connections reach a data service.

Each TCP connection accepted on the local port (127.0.0.1 by default) becomes one WebSocket to
the coordinator's ``GET /api/services/{service}/connect`` with the client's API key; the
coordinator carries it on to the service's worker (through the worker's tunnel, or directly),
and binary messages carry the bytes both ways.  Many connections at once are many WebSockets
(the worker's tunnel multiplexes them as streams).  Light: ``websockets`` only, no server stack.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

from rma import __version__
from rma.client import RmaError

log = logging.getLogger("rma.connect")

#: Bytes read from the local socket per WebSocket message (the tunnel's frame payload size).
CHUNK = 64 * 1024


def connect_url(coordinator_url: str, service: str, *, check: bool = False) -> str:
    """``http(s)://host[/prefix]`` -> ``ws(s)://host[/prefix]/api/services/{service}/connect``."""
    parts = urlsplit(coordinator_url.rstrip("/"))
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme.lower())
    if scheme is None or not parts.netloc:
        raise RmaError("bad_setting", f"not an http(s) URL: {coordinator_url!r}")
    path = f"{parts.path}/api/services/{quote(service, safe='')}/connect"
    return urlunsplit((scheme, parts.netloc, path, "check=1" if check else "", ""))


def _ssl(url: str, verify: ssl.SSLContext | bool) -> ssl.SSLContext | None:
    if not url.startswith("wss:"):
        return None
    if isinstance(verify, ssl.SSLContext):
        return verify
    ctx = ssl.create_default_context()
    if not verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def refusal(exc: BaseException) -> RmaError:
    """The coordinator's ``{"error": ...}`` (or the transport failure) as an :class:`RmaError`."""
    from websockets.exceptions import InvalidStatus

    if isinstance(exc, InvalidStatus):
        resp = exc.response
        try:
            err = json.loads(resp.body or b"")["error"]
            return RmaError(str(err["code"]), str(err["message"]), resp.status_code)
        except (ValueError, KeyError, TypeError):
            text = (resp.body or b"").decode("utf-8", "replace").strip()[:200]
            message = f"HTTP {resp.status_code} {text}".strip()
            return RmaError("http_error", message, resp.status_code)
    if isinstance(exc, TimeoutError):
        return RmaError("timeout", "the coordinator did not answer in time")
    if isinstance(exc, OSError):
        return RmaError("unreachable", f"cannot reach the coordinator: {exc}")
    return RmaError("connect_failed", f"{type(exc).__name__}: {exc}")


class Forwarder:
    """``await fw.check(); port = await fw.start(); await fw.serve_forever()``."""

    def __init__(
        self,
        coordinator_url: str,
        api_key: str | None,
        service: str,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        verify: ssl.SSLContext | bool = True,
        open_timeout: float = 15.0,
    ) -> None:
        self.url = connect_url(coordinator_url, service)
        self.check_url = connect_url(coordinator_url, service, check=True)
        self.service = service
        self.host = host
        self.port = port
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._ssl = _ssl(self.url, verify)
        self.open_timeout = open_timeout
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        #: Connections forwarded so far, and open now.
        self.accepted = 0
        self.failed = 0

    @property
    def active(self) -> int:
        return len(self._handlers)

    def _connect(self, url: str) -> Any:
        from websockets.asyncio.client import connect

        return connect(
            url,
            additional_headers=self._headers,
            compression=None,
            max_size=None,
            ssl=self._ssl,
            open_timeout=self.open_timeout,
            ping_interval=20,
            ping_timeout=60,
            close_timeout=5,
            user_agent_header=f"rma/{__version__}",
        )

    async def check(self) -> dict[str, Any]:
        """What the coordinator says about the service (holder, connection string); raises
        :class:`RmaError` with its message when it refuses (key, service, no healthy holder)."""
        try:
            async with self._connect(self.check_url) as ws:
                text = await ws.recv()
        except Exception as exc:
            raise refusal(exc) from None
        info: dict[str, Any] = json.loads(text)
        return info

    async def start(self) -> int:
        """Listen; returns the port (the chosen one when ``port`` was 0)."""
        try:
            self._server = await asyncio.start_server(self._handle, self.host, self.port)
        except OSError as exc:
            raise RmaError(
                "port_unavailable", f"cannot listen on {self.host}:{self.port}: {exc.strerror}"
            ) from None
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    async def serve_forever(self) -> None:
        assert self._server is not None
        await self._server.serve_forever()

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._handlers):
            task.cancel()
        for task in list(self._handlers):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._server is not None:
            with contextlib.suppress(Exception):
                await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self.accepted += 1
        try:
            await self._forward(reader, writer)
        finally:
            self._handlers.discard(task)
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def _forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            ws_cm = self._connect(self.url)
            ws = await ws_cm.__aenter__()
        except Exception as exc:
            self.failed += 1
            log.warning("rma connect %s: %s", self.service, refusal(exc).message)
            return
        try:
            await _pump(reader, writer, ws)
        finally:
            await ws_cm.__aexit__(None, None, None)


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, ws: Any) -> None:
    """Bytes both ways until either side closes."""
    from websockets.exceptions import ConnectionClosed

    async def up() -> None:  # local socket -> coordinator
        while data := await reader.read(CHUNK):
            await ws.send(data)
        await ws.close()

    async def down() -> None:  # coordinator -> local socket
        async for message in ws:
            if isinstance(message, str):
                continue  # control text is not part of the stream
            writer.write(message)
            await writer.drain()
        if writer.can_write_eof():
            with contextlib.suppress(OSError):
                writer.write_eof()

    tasks = [asyncio.create_task(up()), asyncio.create_task(down())]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            exc = task.exception()
            if exc is not None and not isinstance(exc, (ConnectionClosed, OSError)):
                log.warning("rma connect: %s: %s", type(exc).__name__, exc)
        if tasks[0] in done and tasks[0].exception() is None:
            # the local client ended: the service may still answer until it closes
            with contextlib.suppress(Exception):
                await asyncio.wait_for(tasks[1], 10)
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
