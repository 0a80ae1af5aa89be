"""The worker's end of the tunnel: dial out to the coordinator, serve its requests locally.

A worker behind NAT cannot be reached, so the agent opens ``GET /api/worker/tunnel`` (a
WebSocket, its credential as Bearer) and keeps it open: keepalive pings, reconnection with backoff
and jitter, also after a coordinator restart.  Each request that comes down the tunnel is sent
with httpx to the local service (``endpoints(service)`` gives its base URL) and the answer is
streamed back as it is produced.  A request the coordinator cancels is cancelled here too.
Protocol: :mod:`rma.tunnel`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import AsyncIterator, Callable
from urllib.parse import urlsplit, urlunsplit

import httpx

from rma import __version__
from rma.agent.backoff import Backoff
from rma.tunnel.frames import (
    MAX_FRAME,
    SUBPROTOCOL,
    TUNNEL_PATH,
    FrameType,
    ProtocolError,
    end_to_end,
    headers_from_json,
)
from rma.tunnel.mux import Mux
from rma.tunnel.stream import Stream, StreamReset, TunnelClosed

log = logging.getLogger("rma.agent.tunnel")

_DROP_REQUEST = frozenset({"host"})


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
        coordinator_url: str,
        credential: Callable[[], str],
        endpoints: Callable[[str], str | None],
        verify: ssl.SSLContext | bool,
        *,
        ping_interval: float = 15.0,
        ping_timeout: float = 30.0,
        connect_timeout: float = 10.0,
        service_connect_timeout: float = 5.0,
        backoff: Backoff | None = None,
    ) -> None:
        self.url = tunnel_url(coordinator_url)
        self._credential = credential
        self._endpoints = endpoints
        self._ssl = _ssl_context(verify) if self.url.startswith("wss:") else None
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.connect_timeout = connect_timeout
        self.service_connect_timeout = service_connect_timeout
        self.backoff = backoff or Backoff(base=0.5, cap=30.0, jitter=0.5)
        #: True while the tunnel is open.
        self.connected = False
        #: Successful connections so far (a reconnect adds one).
        self.connects = 0
        #: Why the last connection ended or failed, for ``rma worker status``.
        self.last_error: str | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self._connected_event = asyncio.Event()

    @property
    def inflight(self) -> int:
        """Requests being served through the tunnel right now."""
        return len(self._handlers)

    async def wait_connected(self) -> None:
        await self._connected_event.wait()

    async def run(self) -> None:
        """Connect, serve, reconnect; until cancelled."""
        async with httpx.AsyncClient(
            timeout=httpx.Timeout(
                connect=self.service_connect_timeout, read=None, write=None, pool=None
            ),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=64),
            follow_redirects=False,
            trust_env=False,
        ) as http:
            while True:
                try:
                    problem = await self._session(http)
                except Exception as exc:
                    problem = _describe(exc)
                self.last_error = problem
                delay = self.backoff.next()
                log.warning("tunnel: %s; reconnecting in %.1f s", problem, delay)
                await asyncio.sleep(delay)

    async def _session(self, http: httpx.AsyncClient) -> str:
        from websockets.asyncio.client import connect
        from websockets.typing import Subprotocol

        async with connect(
            self.url,
            additional_headers={"Authorization": f"Bearer {self._credential()}"},
            subprotocols=[Subprotocol(SUBPROTOCOL)],
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
                mux.close(reason)
                handlers = list(self._handlers)
                for task in handlers:
                    task.cancel()
                for task in handlers:
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
        return reason

    def _spawn(self, stream: Stream, http: httpx.AsyncClient) -> None:
        task = asyncio.get_running_loop().create_task(self._forward(stream, http))
        self._handlers.add(task)
        task.add_done_callback(self._handlers.discard)

        def cancel(_exc: BaseException) -> None:
            task.cancel()

        stream.on_reset = cancel

    async def _forward(self, stream: Stream, http: httpx.AsyncClient) -> None:
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
            base = self._endpoints(service)
            if base is None:
                await stream.reset(
                    "no_service", f"service {service} is not running (healthy) on this worker"
                )
                return
            if not any(k == "accept-encoding" for k, _ in headers):
                headers.append(("accept-encoding", "identity"))  # not httpx's gzip default
            content = None if stream.exhausted else _request_body(stream)
            try:
                request = http.build_request(
                    method, base.rstrip("/") + path, headers=headers, content=content
                )
                response = await http.send(request, stream=True)
            except httpx.HTTPError as exc:
                await stream.reset("unreachable", f"service {service}: {_describe(exc)}")
                return
            try:
                raw = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in response.headers.raw]
                await stream.send_head(
                    FrameType.HEAD,
                    {"status": response.status_code, "headers": [list(h) for h in end_to_end(raw)]},
                    fin=False,
                )
                left = _content_length(response)
                async for chunk in response.aiter_raw():
                    if left is not None:  # FIN on the last chunk: one frame less per answer
                        left -= len(chunk)
                        if left <= 0:
                            await stream.write(chunk, fin=True)
                            break
                    await stream.write(chunk)
                else:
                    await stream.write(b"", fin=True)
            except httpx.HTTPError as exc:
                await stream.reset("broken", f"service {service}: {_describe(exc)}")
                return
            finally:
                await response.aclose()
            if not stream.remote_ended:  # answered before reading the whole request body
                await stream.reset("done", "the response is complete")
        except (StreamReset, TunnelClosed):
            return  # the coordinator cancelled, or the tunnel died: nothing to answer
        except Exception as exc:
            log.exception("tunnel: request failed")
            with contextlib.suppress(Exception):
                await stream.reset("internal", f"{type(exc).__name__}: {exc}")


async def _request_body(stream: Stream) -> AsyncIterator[bytes]:
    while (chunk := await stream.read()) is not None:
        yield chunk


def _content_length(response: httpx.Response) -> int | None:
    if "content-length" not in response.headers:  # counts raw bytes, as aiter_raw gives them
        return None
    try:
        return int(response.headers["content-length"])
    except ValueError:
        return None


def _ssl_context(verify: ssl.SSLContext | bool) -> ssl.SSLContext:
    if isinstance(verify, ssl.SSLContext):
        return verify
    ctx = ssl.create_default_context()
    if not verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _describe(exc: BaseException) -> str:
    from websockets.exceptions import InvalidStatus

    if isinstance(exc, InvalidStatus):
        resp = exc.response
        text = resp.body.decode("utf-8", "replace").strip()[:200] if resp.body else ""
        return f"the coordinator refused the tunnel: HTTP {resp.status_code} {text}".strip()
    if isinstance(exc, httpx.ConnectError):
        return f"connection failed: {exc}"
    if isinstance(exc, httpx.TimeoutException):
        return f"timed out ({type(exc).__name__})"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
