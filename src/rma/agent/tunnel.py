"""The worker's end of the tunnel: dial out to the coordinator, serve its requests locally.

A worker behind NAT cannot be reached, so the agent opens ``GET /api/worker/tunnel`` (a
WebSocket, its credential as Bearer) and keeps it open: keepalive pings, reconnection with backoff
and jitter, also after a coordinator restart, and credential refreshes.  Each request that comes
down the tunnel goes to the local service (``endpoints(service)`` gives its base URL) over a
light pooled HTTP/1.1 client (:mod:`rma._http1`), and the answer is streamed back as it is
produced.  A request the coordinator cancels is cancelled here too.  Protocol: :mod:`rma.tunnel`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Callable
from urllib.parse import urlsplit, urlunsplit

from rma import __version__
from rma._http1 import H1Client, H1Error
from rma.agent.backoff import Backoff
from rma.client import Coordinators
from rma.tunnel.frames import (
    MAX_DATA,
    MAX_FRAME,
    SUBPROTOCOL,
    SUBPROTOCOLS,
    TUNNEL_PATH,
    FrameType,
    ProtocolError,
    encode,
    end_to_end,
    headers_from_json,
)
from rma.tunnel.mux import Mux
from rma.tunnel.pipe import splice
from rma.tunnel.stream import Stream, StreamReset, TunnelClosed

log = logging.getLogger("rma.agent.tunnel")

#: Set by the HTTP client itself.
_DROP_REQUEST = frozenset({"host", "content-length"})


def tunnel_url(coordinator_url: str) -> str:
    """``http(s)://host[:port][/prefix]`` -> ``ws(s)://host[:port][/prefix]/api/worker/tunnel``."""
    parts = urlsplit(coordinator_url.rstrip("/"))
    scheme = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}.get(parts.scheme.lower())
    if scheme is None or not parts.netloc:
        raise ValueError(f"not an http(s) URL: {coordinator_url!r}")
    return urlunsplit((scheme, parts.netloc, parts.path + TUNNEL_PATH, "", ""))


class TunnelClient:
    """Keeps this worker's tunnel open until cancelled (``await client.run()``)."""

    def __init__(
        self,
        coordinator_url: str | Coordinators,
        credential: Callable[[], str],
        endpoints: Callable[[str], str | None],
        verify: ssl.SSLContext | bool,
        *,
        ping_interval: float = 15.0,
        ping_timeout: float = 30.0,
        connect_timeout: float = 10.0,
        service_connect_timeout: float = 5.0,
        backoff: Backoff | None = None,
        refresh_interval: float | None = 5.0,
        on_failover: Callable[[str], None] | None = None,
        tcp_endpoints: Callable[[str], tuple[str, int] | None] | None = None,
    ) -> None:
        #: The coordinators (one, or several to fail over between, shared with the agent's
        #: client); a connection that cannot be made moves the tunnel to the next at once.
        self.urls = (
            coordinator_url
            if isinstance(coordinator_url, Coordinators)
            else Coordinators(coordinator_url)
        )
        for url in self.urls.all:
            tunnel_url(url)  # a bad URL is an error now, not at the first connection
        #: Called with the new coordinator's URL after a failover (the agent heartbeats there).
        self.on_failover = on_failover
        self._credential = credential
        self._endpoints = endpoints
        #: ``(host, port)`` of a healthy ``kind = "tcp"`` service (``rma connect``), else None.
        self._tcp_endpoints = tcp_endpoints
        #: TCP connections (``rma connect``) open through the tunnel right now.
        self.tcp_connections = 0
        self._ssl = _ssl_context(verify) if self.url.startswith("wss:") else None
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.connect_timeout = connect_timeout
        self.service_connect_timeout = service_connect_timeout
        self.backoff = backoff or Backoff(base=0.5, cap=30.0, jitter=0.5)
        #: How often to look for a renewed credential (``credential()`` changed) and send it
        #: up the tunnel; ``None``: never (the coordinator then closes the tunnel when the
        #: credential expires, and the agent reconnects with the renewed one).
        self.refresh_interval = refresh_interval
        #: True while the tunnel is open.
        self.connected = False
        #: Successful connections so far (a reconnect adds one).
        self.connects = 0
        #: Why the last connection ended or failed, for ``rma worker status``.
        self.last_error: str | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        #: Requests the tunnel has carried to this agent's services since it started.
        self.served = 0
        self._by_service: dict[str, int] = {}
        self._connected_event = asyncio.Event()

    @property
    def url(self) -> str:
        """The tunnel's WebSocket URL at the coordinator in use."""
        return tunnel_url(self.urls.current)

    @property
    def inflight(self) -> int:
        """Requests being served through the tunnel right now."""
        return len(self._handlers)

    def inflight_by_service(self) -> dict[str, int]:
        """Requests being served through the tunnel right now, per service (for heartbeats)."""
        return {s: n for s, n in self._by_service.items() if n > 0}

    async def wait_connected(self) -> None:
        await self._connected_event.wait()

    async def run(self) -> None:
        """Connect, serve, reconnect; until cancelled."""
        http = H1Client(self.service_connect_timeout, max_idle_per_origin=64)
        try:
            while True:
                base = self.urls.current
                try:
                    problem = await self._session(http)
                except Exception as exc:
                    problem = _describe(exc)
                    if _unreachable(exc) and self.urls.failed(base):
                        self.backoff.reset()  # a live coordinator is likely: try it soon
                        log.warning("tunnel: %s; moving to %s", problem, self.urls.current)
                        if self.on_failover is not None:
                            self.on_failover(self.urls.current)
                self.last_error = problem
                delay = self.backoff.next()
                log.warning("tunnel: %s; reconnecting in %.1f s", problem, delay)
                await asyncio.sleep(delay)
        finally:
            await http.aclose()

    async def _session(self, http: H1Client) -> str:
        from websockets.asyncio.client import connect
        from websockets.typing import Subprotocol

        credential = self._credential()
        async with connect(
            self.url,
            additional_headers={"Authorization": f"Bearer {credential}"},
            subprotocols=[Subprotocol(p) for p in SUBPROTOCOLS],
            compression=None,
            max_size=MAX_FRAME,
            ssl=self._ssl,
            open_timeout=self.connect_timeout,
            ping_interval=self.ping_interval,
            ping_timeout=self.ping_timeout,
            close_timeout=5,
            user_agent_header=f"rma-agent/{__version__}",
        ) as ws:
            mux = Mux(ws.send, on_open=lambda stream: self._spawn(stream, http))
            refresher = None
            if self.refresh_interval is not None and ws.subprotocol == SUBPROTOCOL:
                refresher = asyncio.create_task(self._refresh(mux, credential))
            self.backoff.reset()
            self.connects += 1
            self.connected = True
            self._connected_event.set()
            log.info("tunnel connected to %s", self.url)
            reason = "the coordinator closed the tunnel"
            try:
                async for message in ws:
                    if isinstance(message, str):
                        raise ProtocolError("text message on the tunnel")
                    await mux.feed(message)
                if ws.close_code is not None:
                    detail = f": {ws.close_reason}" if ws.close_reason else ""
                    reason += f" (code {ws.close_code}{detail})"
            finally:
                self.connected = False
                self._connected_event.clear()
                if refresher is not None:
                    refresher.cancel()
                mux.close(reason)
                handlers = list(self._handlers)
                for task in handlers:
                    task.cancel()
                for task in handlers:
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
        return reason

    async def _refresh(self, mux: Mux, sent: str) -> None:
        """Send each renewed credential up the tunnel (``CREDENTIAL``), so it outlives the first."""
        assert self.refresh_interval is not None
        with contextlib.suppress(TunnelClosed):
            while True:
                await asyncio.sleep(self.refresh_interval)
                current = self._credential()
                if current and current != sent:
                    await mux.send(encode(FrameType.CREDENTIAL, 0, current.encode()))
                    sent = current

    def _spawn(self, stream: Stream, http: H1Client) -> None:
        task = asyncio.get_running_loop().create_task(self._forward(stream, http))
        self.served += 1
        self._handlers.add(task)
        task.add_done_callback(self._handlers.discard)

        def cancel(_exc: BaseException) -> None:
            task.cancel()

        stream.on_reset = cancel

    async def _forward(self, stream: Stream, http: H1Client) -> None:
        """One request: to the local service and its answer back, chunk by chunk."""
        try:
            head = await stream.head()
            try:
                service = str(head["service"])
                method = str(head["method"])
                path = str(head["path"])
                headers = end_to_end(headers_from_json(head["headers"]), drop=_DROP_REQUEST)
            except (KeyError, ProtocolError) as exc:
                await stream.reset("bad_request", f"malformed request head: {exc}")
                return
            if not path.startswith("/"):
                await stream.reset("bad_request", f"path must start with '/': {path!r}")
                return
            if head.get("tcp") is True:
                await self._pipe(stream, service)
                return
            base = self._endpoints(service)
            if base is None:
                await stream.reset(
                    "no_service", f"service {service} is not running (healthy) on this worker"
                )
                return
            self._by_service[service] = self._by_service.get(service, 0) + 1
            try:
                await self._relay(stream, http, service, method, base, path, headers)
            finally:
                self._by_service[service] -= 1
        except (StreamReset, TunnelClosed):
            return  # the coordinator cancelled, or the tunnel died: nothing to answer
        except Exception as exc:
            log.exception("tunnel: request failed")
            with contextlib.suppress(Exception):
                await stream.reset("internal", f"{type(exc).__name__}: {exc}")

    async def _pipe(self, stream: Stream, service: str) -> None:
        """A TCP connection to a data service: connect locally, then copy bytes both ways."""
        target = self._tcp_endpoints(service) if self._tcp_endpoints is not None else None
        if target is None:
            await stream.reset("no_service", f"no healthy TCP service {service} on this worker")
            return
        try:
            async with asyncio.timeout(self.service_connect_timeout):
                reader, writer = await asyncio.open_connection(*target)
        except (OSError, TimeoutError) as exc:
            await stream.reset("unreachable", f"service {service}: {type(exc).__name__}: {exc}")
            return
        self.tcp_connections += 1
        try:
            await stream.send_head(FrameType.HEAD, {"status": 200, "headers": []}, fin=False)
            await splice(stream, reader, writer)
        finally:
            self.tcp_connections -= 1
            writer.close()

    async def _relay(
        self,
        stream: Stream,
        http: H1Client,
        service: str,
        method: str,
        base: str,
        path: str,
        headers: list[tuple[str, str]],
    ) -> None:
        """Read the request body, send it to the local service, stream its answer back."""
        # The request body: usually all in the OPEN frame; else read to its end (the gateway
        # buffers request bodies too, with a size limit; reading grants the sender credit).
        parts = []
        while (chunk := await stream.read()) is not None:
            parts.append(chunk)
        body = parts[0] if len(parts) == 1 else b"".join(parts)
        try:
            response = await http.send(method, base, path, headers, body)
        except H1Error as exc:
            code = "unreachable" if exc.before_response else "broken"
            await stream.reset(code, f"service {service}: {exc}")
            return
        except ValueError as exc:  # a malformed endpoint URL
            await stream.reset("unreachable", f"service {service}: {exc}")
            return
        try:
            # The head and whatever of the body already arrived go in one frame: a small
            # answer is a single HEAD frame with FIN.
            first = response.take_buffered(MAX_DATA)
            await stream.send_head(
                FrameType.HEAD,
                {
                    "status": response.status,
                    "headers": [list(h) for h in end_to_end(response.headers)],
                },
                first,
                fin=response.at_end,
            )
            if not response.at_end:
                async for chunk in response.aiter_bytes():
                    if more := response.take_buffered(MAX_DATA - len(chunk)):
                        chunk += more  # what else already arrived: one frame, no delay
                    await stream.write(chunk, fin=response.at_end)
                    if response.at_end:
                        break
                else:
                    await stream.write(b"", fin=True)
        except H1Error as exc:
            await stream.reset("broken", f"service {service}: {exc}")
            return
        finally:
            await response.aclose()


def _ssl_context(verify: ssl.SSLContext | bool) -> ssl.SSLContext:
    if isinstance(verify, ssl.SSLContext):
        return verify
    ctx = ssl.create_default_context()
    if not verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _unreachable(exc: BaseException) -> bool:
    """Whether the coordinator seems gone (another may serve): no connection, no answer, or a
    proxy's 502/503/504; not a refusal, nor a certificate that fails its pin."""
    from websockets.exceptions import InvalidStatus

    from rma.client import pin_problem

    if isinstance(exc, InvalidStatus):
        return exc.response.status_code in (502, 503, 504)
    if isinstance(exc, ssl.SSLError) or pin_problem(exc) is not None:
        return False
    return isinstance(exc, OSError | TimeoutError)


def _describe(exc: BaseException) -> str:
    from websockets.exceptions import InvalidStatus

    from rma.client import pin_problem

    pinned = pin_problem(exc)
    if pinned is not None:
        return f"refusing the coordinator: {pinned}"

    if isinstance(exc, InvalidStatus):
        resp = exc.response
        text = resp.body.decode("utf-8", "replace").strip()[:200] if resp.body else ""
        return f"the coordinator refused the tunnel: HTTP {resp.status_code} {text}".strip()
    if isinstance(exc, TimeoutError):  # before OSError, its base class
        return f"timed out ({type(exc).__name__})"
    if isinstance(exc, OSError):
        return f"connection failed: {exc}"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
