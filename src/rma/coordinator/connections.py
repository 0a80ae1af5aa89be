"""Connection hygiene: what uvicorn itself does not bound.

uvicorn closes idle keep-alive connections (``timeout_keep_alive``) but has no limit on how long
a client may take to send its request headers (slowloris), on their size (its httptools parser
takes a megabyte of headers), or on how many connections one address or everyone together may
hold; a flood of idle sockets then exhausts the coordinator's file descriptors and every request
fails.  :func:`protocol_class` is uvicorn's httptools protocol with those limits, passed to
``uvicorn.Config(http=...)``:

- a connection over ``max_connections`` in total, or over ``max_connections_per_address`` from
  one address, is answered at once with a small 503 (no parsing, no app) and closed;
- request headers (the first request's, and each next one's from its first byte) must arrive
  within ``header_timeout`` seconds, else 408 and the connection is closed;
- request line and headers over ``max_header_bytes`` get 431 and the connection is closed.

WebSocket tunnels leave the counts when they upgrade (the tunnel authenticates the worker).
:class:`ConnectionGuard` holds the counts; ``/readyz`` reads it (503 while saturated).
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger("rma.coordinator.connections")

#: File descriptors kept free for the database, upstream connections and logs.
FD_RESERVE = 256


def raise_nofile_limit() -> int:
    """Raise the soft open-file limit to the hard limit; return the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (OSError, ValueError) as exc:
            log.warning("cannot raise the open-file limit from %d to %d: %s", soft, target, exc)
    return int(soft) if soft != resource.RLIM_INFINITY else 1 << 20


def default_max_connections(nofile: int) -> int:
    """Connections the coordinator may hold: the open-file limit less a reserve."""
    return max(64, nofile - max(FD_RESERVE, nofile // 4))


def _response(status: int, reason: bytes, code: str, message: str, retry: bool = False) -> bytes:
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    head = [
        b"HTTP/1.1 %d %s" % (status, reason),
        b"content-type: application/json",
        b"content-length: %d" % len(body),
        b"connection: close",
    ]
    if retry:
        head.append(b"retry-after: 1")
    return b"\r\n".join(head) + b"\r\n\r\n" + body


class ConnectionGuard:
    """Open connections, in total and per address, and the limits (shared by all of them)."""

    def __init__(
        self,
        *,
        max_connections: int,
        max_per_address: int,
        header_timeout: float,
        max_header_bytes: int,
    ) -> None:
        self.max_connections = max_connections
        self.max_per_address = max_per_address
        self.header_timeout = header_timeout
        self.max_header_bytes = max_header_bytes
        self.total = 0
        self.by_address: dict[str, int] = {}
        self.refused = {"total": 0, "address": 0, "header_timeout": 0, "header_size": 0}

    def admit(self, addr: str) -> str | None:
        """Count a new connection from ``addr``; the reason it is refused instead, if so."""
        if self.total >= self.max_connections:
            self.refused["total"] += 1
            return "total"
        if self.max_per_address and self.by_address.get(addr, 0) >= self.max_per_address:
            self.refused["address"] += 1
            return "address"
        self.total += 1
        self.by_address[addr] = self.by_address.get(addr, 0) + 1
        return None

    def release(self, addr: str) -> None:
        self.total -= 1
        n = self.by_address.get(addr, 0) - 1
        if n > 0:
            self.by_address[addr] = n
        else:
            self.by_address.pop(addr, None)

    def saturated(self) -> str | None:
        """Why new connections are refused now (``None`` while they are not)."""
        if self.total >= self.max_connections:
            return (
                f"{self.total} of max_connections={self.max_connections} connections are open: "
                "new ones get 503"
            )
        return None

    def busy_response(self, reason: str) -> bytes:
        if reason == "total":
            message = (
                f"the coordinator holds its connection cap ({self.max_connections}); try again"
            )
        else:
            message = (
                f"too many connections from this address (max_connections_per_address="
                f"{self.max_per_address})"
            )
        return _response(503, b"Service Unavailable", "saturated", message, retry=True)


def protocol_class(guard: ConnectionGuard) -> type[HttpToolsProtocol]:
    """uvicorn's httptools protocol, bounded by ``guard`` (pass it as ``Config(http=...)``)."""
    import httptools
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    timeout_body = _response(
        408,
        b"Request Timeout",
        "header_timeout",
        f"the request headers did not arrive within {guard.header_timeout:g} s",
    )
    too_large_body = _response(
        431,
        b"Request Header Fields Too Large",
        "headers_too_large",
        f"request headers over {guard.max_header_bytes} bytes",
    )

    class _HeadersTooLarge(Exception):
        pass

    class GuardedProtocol(HttpToolsProtocol):
        """HttpToolsProtocol with connection caps, a header deadline and a header size limit."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._addr = ""
            self._counted = False
            self._refused = False
            self._header_bytes = 0
            self._header_timer: asyncio.TimerHandle | None = None

        # --- the connection --------------------------------------------------------------------

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            peer = transport.get_extra_info("peername")
            self._addr = str(peer[0]) if isinstance(peer, tuple) and peer else "unknown"
            reason = guard.admit(self._addr)
            if reason is not None:
                self._refused = True
                transport.write(guard.busy_response(reason))
                transport.close()
                return
            self._counted = True
            super().connection_made(transport)
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._refused:
                return
            self._forget()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self._refused or self.parser is None:
                return
            self._unset_keepalive_if_required()
            try:
                self.parser.feed_data(data)
            except httptools.HttpParserUpgrade:
                if self._should_upgrade():
                    self.handle_websocket_upgrade()
                else:
                    self._unsupported_upgrade_warning()
            except httptools.HttpParserError as exc:
                if isinstance(exc.__context__, _HeadersTooLarge) or self._header_bytes > (
                    guard.max_header_bytes
                ):
                    guard.refused["header_size"] += 1
                    self._close_with(too_large_body)
                    return
                self.logger.warning("Invalid HTTP request received.")
                self.send_400_response("Invalid HTTP request received.")

        def handle_websocket_upgrade(self) -> None:
            self._forget()  # a tunnel now: it leaves the HTTP counts
            super().handle_websocket_upgrade()

        # --- the request headers ---------------------------------------------------------------

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._header_bytes = 0
            if self._header_timer is None:
                self._arm()

        def on_url(self, url: bytes) -> None:
            self._grow(len(url))
            super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            self._grow(len(name) + len(value) + 4)
            super().on_header(name, value)

        def on_headers_complete(self) -> None:
            self._disarm()
            super().on_headers_complete()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            # idle now: uvicorn's keep-alive timeout runs until the next request's first byte

        # --- helpers ---------------------------------------------------------------------------

        def _grow(self, n: int) -> None:
            self._header_bytes += n
            if self._header_bytes > guard.max_header_bytes:
                raise _HeadersTooLarge

        def _arm(self) -> None:
            self._disarm()
            self._header_timer = self.loop.call_later(guard.header_timeout, self._header_late)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _header_late(self) -> None:
            self._header_timer = None
            if self.cycle is not None and not self.cycle.response_complete:
                return  # a request is being served: not ours to cut
            guard.refused["header_timeout"] += 1
            self._close_with(timeout_body)

        def send_400_response(self, msg: str) -> None:
            """A request the HTTP parser cannot read (bad framing, bad header bytes): the same
            ``{"error": ...}`` JSON as every other answer, not uvicorn's plain text; then the
            connection is closed."""
            self._close_with(
                _response(400, b"Bad Request", "bad_request", msg.rstrip(".") or "bad request")
            )

        def _close_with(self, response: bytes) -> None:
            self._disarm()
            if self.transport is not None and not self.transport.is_closing():
                self.transport.write(response)
                self.transport.close()

        def _forget(self) -> None:
            self._disarm()
            if self._counted:
                self._counted = False
                guard.release(self._addr)

    return GuardedProtocol
