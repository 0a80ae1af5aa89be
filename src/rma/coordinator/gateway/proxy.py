"""The gateway: authenticate, route by model or service name, forward with failover, relay.

The hot path is raw ASGI: no pydantic, no Request objects, one ``json.loads`` of the request
body (for ``model``), no database (usage goes to an in-memory buffer; an API key is checked in
memory, and only a key this coordinator has never seen is looked up, once, in a thread).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from dataclasses import dataclass

from starlette.types import Message, Receive, Scope, Send

from rma.coordinator.auth import FailureLimiter, role_of
from rma.coordinator.credentials import KeyInfo
from rma.coordinator.errors import APIError
from rma.coordinator.gateway.asgi import ClientGone, header, read_body, send_error, sse_error
from rma.coordinator.gateway.balancer import Balancer
from rma.coordinator.gateway.direct import DirectUpstream
from rma.coordinator.gateway.headers import request_headers, response_header_allowed
from rma.coordinator.gateway.ratelimit import RateLimiter
from rma.coordinator.gateway.upstream import (
    Upstream,
    UpstreamError,
    UpstreamRequest,
    UpstreamResponse,
)
from rma.coordinator.gateway.usage import UsageRecord, UsageRecorder, tokens_in
from rma.coordinator.metrics import Metrics
from rma.coordinator.pool import Pool
from rma.coordinator.registry import WorkerState
from rma.coordinator.trust.credits import Ledger
from rma.coordinator.trust.verifier import Verifier
from rma.settings import CoordinatorSettings

log = logging.getLogger("rma.gateway")

_HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"trailers",
        b"transfer-encoding",
        b"upgrade",
    }
)
#: Response headers not passed back (the server adds its own ``date``).
_DROP_RESPONSE = _HOP_BY_HOP | {b"date", b"server"}
_RETRY_STATUSES = (502, 503)
_TAIL = 1024

REQUESTS = "rma_gateway_requests_total"
LATENCY = "rma_gateway_request_duration_seconds"
FIRST_BYTE = "rma_gateway_first_byte_seconds"
RETRIES = "rma_gateway_retries_total"
BROKEN = "rma_gateway_broken_streams_total"


@dataclass(slots=True)
class _Call:
    """One client request's bookkeeping."""

    started: float
    key: KeyInfo | None = None
    service: str = ""
    worker: WorkerState | None = None
    status: int = 0
    attempts: int = 0
    tail: bytes = b""


class Gateway:
    def __init__(
        self,
        pool: Pool,
        settings: CoordinatorSettings,
        metrics: Metrics,
        auth_limiter: FailureLimiter,
    ) -> None:
        self.pool = pool
        self.settings = settings
        self.metrics = metrics
        self.auth_limiter = auth_limiter
        self.upstreams: list[Upstream] = []
        self.direct = DirectUpstream(settings.connect_timeout)
        self.add_upstream(self.direct)
        self.balancer = Balancer(
            pool.registry,
            capacity=settings.worker_capacity,
            queue_size=settings.queue_size,
            queue_timeout=settings.queue_timeout,
            cooldown_base=settings.cooldown_base,
            cooldown_max=settings.cooldown_max,
            reachable=self.reachable,
        )
        #: Local per coordinator; with Redis, ``mount`` puts the shared one here.
        self.limiter: RateLimiter = RateLimiter()
        self.usage = UsageRecorder(pool.engine)
        self.verifier = Verifier(self)  # coordinator/trust: re-runs and compares answers
        self.ledger = Ledger(pool.engine, settings)  # coordinator/trust: the credits

    # --- transports -------------------------------------------------------------------------------

    def add_upstream(self, upstream: Upstream, *, first: bool = False) -> None:
        """Register a transport (the tunnel hub adds itself here)."""
        if first:
            self.upstreams.insert(0, upstream)
        else:
            self.upstreams.append(upstream)

    def upstream_for(self, worker: WorkerState) -> Upstream | None:
        for upstream in self.upstreams:
            if upstream.available(worker):
                return upstream
        return None

    def reachable(self, worker: WorkerState) -> bool:
        return self.upstream_for(worker) is not None

    async def aclose(self) -> None:
        await self.verifier.aclose()
        await self.direct.aclose()
        await self.usage.close()
        await self.ledger.close()

    # --- auth -------------------------------------------------------------------------------------

    async def authenticate(self, scope: Scope) -> KeyInfo | None:
        """The client's API key; ``None`` for an anonymous client (when allowed)."""
        raw = header(scope, b"authorization")
        secret = None
        if raw:
            scheme, _, value = raw.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and value.strip():
                secret = value.strip()
        creds = self.pool.credentials
        limiter = self.auth_limiter
        addr = scope["client"][0] if scope.get("client") else "unknown"
        if secret is not None:
            info = await creds.find_key(secret)
            if info is not None:
                return info  # a valid key is never refused for failures (its own or others')
            self._refuse_other_roles(secret)
            if self.settings.anonymous_clients:
                return None
            raise limiter.refuse(
                limiter.buckets("client", addr),
                APIError(
                    401,
                    "invalid API key",
                    "invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"},
                ),
            )
        if self.settings.anonymous_clients:
            return None
        raise limiter.refuse(
            limiter.buckets("client", addr),
            APIError(
                401,
                "an API key is required (Authorization: Bearer <key>; rma admin keys create)",
                "missing_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            ),
        )

    def _refuse_other_roles(self, secret: str) -> None:
        """403 for an admin key or a worker credential: the roles are kept apart."""
        if self.pool.credentials.is_admin(secret):
            raise APIError(
                403,
                "the admin key cannot be used as a client API key; create one with "
                "`rma admin keys create`",
                "forbidden",
            )
        if role_of(secret) == "worker":
            try:
                self.pool.authenticate_worker(secret)
            except APIError:
                return
            raise APIError(
                403, "a worker credential cannot be used as a client API key", "forbidden"
            )

    # --- routes -----------------------------------------------------------------------------------

    async def models(self, scope: Scope, receive: Receive, send: Send) -> None:
        """``GET /v1/models`` and ``GET /v1/models/{model}``: models of healthy services."""
        from rma.coordinator.gateway.asgi import send_json

        try:
            await self.authenticate(scope)
        except APIError as exc:
            await send_error(send, exc.status, exc.code, exc.message, exc.headers)
            return
        data = [
            {
                "id": m,
                "object": "model",
                "created": 0,
                "owned_by": "rma",
                "service": name,
                "task": spec.task,
            }
            for name, spec in self.pool.catalog.items()
            if spec.kind == "openai" and self.balancer.workers_for(name)
            for m in spec.models
        ]
        wanted = scope.get("path_params", {}).get("model")
        if wanted is None:
            await send_json(send, 200, {"object": "list", "data": data})
            return
        for item in data:
            if item["id"] == wanted:
                await send_json(send, 200, item)
                return
        await send_error(send, 404, "model_not_found", f"no healthy service serves {wanted!r}")

    async def openai(self, scope: Scope, receive: Receive, send: Send) -> None:
        """``POST /v1/chat/completions | /v1/completions | /v1/embeddings``: routed by model."""
        call = _Call(time.perf_counter())
        try:
            call.key = await self.authenticate(scope)
            await self._rate_limit(call)
            body = await read_body(receive)
            call.service = self._service_for_body(body)
            qs = scope.get("query_string", b"")
            path = scope["path"] + ("?" + qs.decode("latin-1") if qs else "")
            await self._forward(call, scope, receive, send, path, body)
        except APIError as exc:
            call.status = exc.status
            await send_error(send, exc.status, exc.code, exc.message, exc.headers)
        except ClientGone:
            call.status = 413 if scope.get("rma.body_too_large") else 499
        finally:
            self._done(call)

    async def service(self, scope: Scope, receive: Receive, send: Send) -> None:
        """``ANY /api/services/{service}/{path}``: any other service, by name."""
        call = _Call(time.perf_counter())
        try:
            call.key = await self.authenticate(scope)
            name = scope["path_params"]["service"]
            if name not in self.pool.catalog:
                raise APIError(404, f"no service {name!r} in the catalog", "unknown_service")
            call.service = name
            await self._rate_limit(call)
            body = await read_body(receive)
            prefix = f"/api/services/{name}".encode()
            raw_path: bytes = scope.get("raw_path") or scope["path"].encode()
            rest = raw_path[len(prefix) :] if raw_path.startswith(prefix) else b"/"
            rest = rest.split(b"?", 1)[0] or b"/"
            qs = scope.get("query_string", b"")
            path = rest.decode("latin-1") + ("?" + qs.decode("latin-1") if qs else "")
            await self._forward(call, scope, receive, send, path, body)
        except APIError as exc:
            call.status = exc.status
            await send_error(send, exc.status, exc.code, exc.message, exc.headers)
        except ClientGone:
            call.status = 413 if scope.get("rma.body_too_large") else 499
        finally:
            self._done(call)

    def _service_for_body(self, body: bytes) -> str:
        try:
            data = json.loads(body)
        except (ValueError, RecursionError):  # also invalid UTF-8, nesting past the stack
            raise APIError(400, "the request body is not valid JSON", "invalid_json") from None
        model = data.get("model") if isinstance(data, dict) else None
        if not isinstance(model, str) or not model:
            raise APIError(400, "the request needs a 'model' (see GET /v1/models)", "no_model")
        service = self.pool.catalog.service_for_model(model)
        if service is None:
            raise APIError(
                404,
                f"no service serves the model {model!r}; GET /v1/models lists the models",
                "model_not_found",
            )
        return service

    async def _rate_limit(self, call: _Call) -> None:
        if call.key is not None:
            await self.limiter.acquire(call.key.id, call.key.rpm)

    # --- forwarding -------------------------------------------------------------------------------

    async def _forward(
        self, call: _Call, scope: Scope, receive: Receive, send: Send, path: str, body: bytes
    ) -> None:
        s = self.settings
        deadline = call.started + s.total_timeout
        headers = request_headers(scope["headers"])  # an allow-list: no cookie, key or address
        request = UpstreamRequest(call.service, scope["method"], path, headers, body)
        # The client may go away while a worker thinks: then the worker's request is cancelled
        # (the tunnel resets its stream, the direct connection is closed), streamed or not.
        trusted_only = (header(scope, b"x-rma-trusted") or b"").lower() in (b"1", b"true", b"yes")
        if self.verifier.quorum_wanted(scope):  # x-rma-verify: quorum
            await self.verifier.quorum(call, request, send)
            return
        send = self.verifier.watch(call, request, send)  # verified after the client has it
        watcher = asyncio.ensure_future(_disconnected(receive))
        try:
            await self._attempts(call, request, send, deadline, watcher, trusted_only)
        finally:
            watcher.cancel()

    async def _attempts(
        self,
        call: _Call,
        request: UpstreamRequest,
        send: Send,
        deadline: float,
        watcher: asyncio.Future[None],
        trusted_only: bool = False,
    ) -> None:
        s = self.settings
        tried: set[str] = set()
        failures: list[str] = []
        timed_out = False
        last_status: int | None = None
        while call.attempts < s.max_attempts:
            lease = await self.balancer.acquire(call.service, tried, trusted_only)
            if lease is None:
                break
            worker = lease.worker
            tried.add(worker.id)
            call.attempts += 1
            call.worker = worker
            if call.attempts > 1:
                self.metrics.inc(RETRIES, (("service", call.service),))
            try:
                upstream = self.upstream_for(worker)
                if upstream is None:
                    failures.append(f"{worker.name}: no transport reaches it")
                    continue
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    timed_out = True
                    break
                opening = asyncio.ensure_future(
                    upstream.open(
                        worker, request, first_byte_timeout=min(s.first_byte_timeout, remaining)
                    )
                )
                await asyncio.wait((opening, watcher), return_when=asyncio.FIRST_COMPLETED)
                if not opening.done():
                    opening.cancel()
                    with contextlib.suppress(BaseException):
                        await opening
                    raise ClientGone
                try:
                    resp = opening.result()
                except UpstreamError as exc:
                    if exc.status is not None:
                        last_status = exc.status
                    timed_out = exc.timeout
                    self._worker_failed(worker, call.service, failures, str(exc))
                    continue
                if resp.status in _RETRY_STATUSES and call.attempts < s.max_attempts:
                    last_status = resp.status
                    with contextlib.suppress(Exception):
                        await resp.aclose()
                    self._worker_failed(
                        worker, call.service, failures, f"answered HTTP {resp.status}"
                    )
                    continue
                self.balancer.succeeded(worker, call.service)
                self.metrics.observe(
                    FIRST_BYTE, time.perf_counter() - call.started, (("service", call.service),)
                )
                await self._relay(call, resp, send, deadline, watcher)
                return
            finally:
                lease.release()
        self._give_up(call, failures, timed_out, last_status)

    def _worker_failed(
        self, worker: WorkerState, service: str, failures: list[str], why: str
    ) -> None:
        failures.append(f"{worker.name}: {why}")
        cooled = self.balancer.failed(worker, service)
        log.warning(
            "gateway: %s on worker %s failed (%s)%s",
            service,
            worker.name,
            why,
            f"; cooling down {cooled:g} s" if cooled else "",
        )

    def _give_up(
        self, call: _Call, failures: list[str], timed_out: bool, last_status: int | None
    ) -> None:
        detail = "; ".join(failures) or "no worker could be reached"
        n = call.attempts
        attempts = f"{n} attempt{'s' if n != 1 else ''}"
        if timed_out:
            raise APIError(
                504, f"service {call.service!r} did not answer in time ({detail})", "timeout"
            )
        if last_status == 503:
            raise APIError(
                503,
                f"service {call.service!r} is unavailable after {attempts} ({detail})",
                "upstream_unavailable",
                headers={"Retry-After": "1"},
            )
        raise APIError(
            502, f"service {call.service!r} failed after {attempts} ({detail})", "upstream_failed"
        )

    async def _relay(
        self,
        call: _Call,
        resp: UpstreamResponse,
        send: Send,
        deadline: float,
        watcher: asyncio.Future[None],
    ) -> None:
        """Stream the answer back as it comes; a broken SSE stream ends with an ``error`` event."""
        sse = False
        out: list[tuple[bytes, bytes]] = []
        try:
            for k, v in resp.headers:
                try:
                    name, value = k.lower().encode("latin-1"), v.encode("latin-1")
                except UnicodeEncodeError:
                    continue  # not a valid HTTP header: dropped, never a 500
                if name in _DROP_RESPONSE or not response_header_allowed(name, value):
                    continue  # an allow-list: no set-cookie, location... from a worker
                if name == b"content-type" and v.startswith("text/event-stream"):
                    sse = True
                out.append((name, value))
            if sse:
                out = [h for h in out if h[0] != b"content-length"]
            worker = call.worker
            name_bytes = (worker.name if worker else "").encode("latin-1", "replace")
            out.append((b"x-rma-worker", name_bytes))
            call.status = resp.status
            await send({"type": "http.response.start", "status": resp.status, "headers": out})
        except BaseException:
            with contextlib.suppress(Exception):
                await resp.aclose()  # the upstream connection or tunnel stream is never leaked
            raise
        error: str | None = None
        code = "stream_broken"
        try:
            error, code = await self._pump(call, resp, send, deadline, watcher)
        finally:
            with contextlib.suppress(Exception):
                await resp.aclose()
        if error is None:
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        self.metrics.inc(BROKEN, (("service", call.service),))
        call.status = 502 if code != "stream_timeout" else 504
        log.warning("gateway: stream from %s broke: %s", worker.name if worker else "?", error)
        if sse:
            await send({"type": "http.response.body", "body": sse_error(code, error)})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        # Otherwise return without completing the response: the server drops the connection,
        # so the client sees a truncated answer as an error, not as a short success.

    async def _pump(
        self,
        call: _Call,
        resp: UpstreamResponse,
        send: Send,
        deadline: float,
        watcher: asyncio.Future[None] | None,
    ) -> tuple[str | None, str]:
        stall = self.settings.stall_timeout
        loop = asyncio.get_running_loop()
        # perf_counter deadline -> loop clock
        loop_deadline = loop.time() + (deadline - time.perf_counter())
        chunks = resp.aiter_bytes().__aiter__()
        tail = b""
        try:
            async with asyncio.timeout(None) as timer:
                while True:
                    timer.reschedule(min(loop.time() + stall, loop_deadline))
                    try:
                        chunk = await chunks.__anext__()
                    except StopAsyncIteration:
                        break
                    timer.reschedule(None)
                    if not chunk:
                        continue
                    tail = (tail + chunk)[-_TAIL:] if len(chunk) < _TAIL else chunk[-_TAIL:]
                    if watcher is not None and watcher.done():
                        return "the client went away", "client_gone"
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except TimeoutError:
            if loop.time() >= loop_deadline - 0.001:
                msg = f"the answer took longer than {self.settings.total_timeout:g} s"
            else:
                msg = f"the worker sent nothing for {stall:g} s"
            return msg, "stream_timeout"
        except UpstreamError as exc:
            return f"the worker's stream broke: {exc}", "stream_broken"
        finally:
            call.tail = tail
            with contextlib.suppress(Exception):
                await chunks.aclose()  # type: ignore[attr-defined]
        return None, ""

    # --- accounting -------------------------------------------------------------------------------

    def _done(self, call: _Call) -> None:
        elapsed = time.perf_counter() - call.started
        service = call.service or "-"
        status = call.status or 500
        labels = (("service", service), ("status", str(status)))
        self.metrics.inc(REQUESTS, labels)
        self.metrics.observe(LATENCY, elapsed, (("service", service),))
        if not call.service:
            return  # rejected before routing (auth, bad body): nothing to account to a service
        if status < 400 and call.worker is not None and call.service in self.pool.catalog:
            weight = self.pool.catalog[call.service].credit_weight
            self.ledger.record(call.worker, call.key.id if call.key else None, call.service,
                               elapsed, weight)  # fmt: skip
        prompt, completion = tokens_in(call.tail)
        self.usage.record(
            UsageRecord(
                ts=time.time(),
                key_id=call.key.id if call.key else None,
                service=call.service,
                worker_id=call.worker.id if call.worker else None,
                status=status,
                latency_ms=round(elapsed * 1000, 3),
                prompt_tokens=prompt,
                completion_tokens=completion,
                attempts=max(call.attempts, 1),
            )
        )


async def _disconnected(receive: Receive) -> None:
    """Returns when the client disconnects (the request body was read already)."""
    while True:
        message: Message = await receive()
        if message["type"] == "http.disconnect":
            return
