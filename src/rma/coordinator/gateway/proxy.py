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
from collections.abc import AsyncIterator, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any

from starlette.types import Message, Receive, Scope, Send

from rma.coordinator.auth import FailureLimiter, role_of
from rma.coordinator.credentials import KeyInfo
from rma.coordinator.errors import APIError
from rma.coordinator.gateway.asgi import ClientGone, header, read_body, send_error, sse_error
from rma.coordinator.gateway.balancer import Balancer, Wish
from rma.coordinator.gateway.connect import DataConnections
from rma.coordinator.gateway.direct import DirectUpstream
from rma.coordinator.gateway.forms import body_model
from rma.coordinator.gateway.headers import request_headers, response_header_allowed
from rma.coordinator.gateway.ratelimit import RateLimiter
from rma.coordinator.gateway.upstream import (
    Upstream,
    UpstreamError,
    UpstreamRequest,
    UpstreamResponse,
)
from rma.coordinator.gateway.usage import UsageRecord, UsageRecorder, tokens_in
from rma.coordinator.gateway.vision import has_image_input
from rma.coordinator.metrics import Metrics
from rma.coordinator.pool import Pool
from rma.coordinator.registry import WorkerState
from rma.coordinator.trust.credits import Ledger
from rma.coordinator.trust.verifier import Verifier
from rma.schemas.api import ServiceSpec
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
#: Content types that are streams by nature: never held back, relayed as they come.
_STREAM_TYPES = ("text/event-stream", "application/x-ndjson", "application/jsonl")
_TAIL = 1024

#: The OpenAI paths every ``kind = "openai"`` service answers (routed by model).
OPENAI_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")

REQUESTS = "rma_gateway_requests_total"
LATENCY = "rma_gateway_request_duration_seconds"
FIRST_BYTE = "rma_gateway_first_byte_seconds"
RETRIES = "rma_gateway_retries_total"
BROKEN = "rma_gateway_broken_streams_total"
ERRORS = "rma_gateway_errors_total"
QUEUE_WAIT = "rma_gateway_queue_wait_seconds"
#: ``rma_gateway_errors_total``'s code for an error status that a worker answered itself.
WORKER_ERROR = "worker_error"


def _wish(scope: Scope, affinity: str | None) -> Wish | None:
    """``x-rma-prefer`` / ``x-rma-require: KEY=VALUE[,...]`` (the workers a request asks for)
    and the conversation's affinity key."""
    prefer = header(scope, b"x-rma-prefer")
    require = header(scope, b"x-rma-require")
    if prefer is None and require is None and affinity is None:
        return None
    return Wish(
        prefer=Wish.parse(prefer.decode("latin-1"), "x-rma-prefer") if prefer else (),
        require=Wish.parse(require.decode("latin-1"), "x-rma-require") if require else (),
        affinity=affinity,
    )


def _affinity_key(scope: Scope, data: dict[str, object], model: str) -> str | None:
    """One conversation's key: ``x-rma-session``, else OpenAI's ``user``, else the model and the
    conversation's first two messages (its system prompt and first question: the prefix a prompt
    cache holds).  ``None`` for requests without messages (embeddings, completions)."""
    session = header(scope, b"x-rma-session")
    if session:
        return f"{model}\0s:{session.decode('latin-1')}"
    user = data.get("user")
    if isinstance(user, str) and user:
        return f"{model}\0u:{user}"
    messages = data.get("messages")
    if not isinstance(messages, list) or not messages:
        return None
    try:
        lead = json.dumps(messages[:2], sort_keys=True, separators=(",", ":"))
    except (TypeError, ValueError):
        return None
    return f"{model}\0m:{lead}"


def _services(catalog: Mapping[str, ServiceSpec], names: list[str]) -> str:
    """``rerank (models: bge-reranker)``: services named with their models, for messages."""
    parts = []
    for name in names:
        models = catalog[name].models
        parts.append(f"{name} (models: {', '.join(models)})" if models else name)
    return ", ".join(parts)


@dataclass(slots=True)
class _Call:
    """One client request's bookkeeping."""

    started: float
    key: KeyInfo | None = None
    service: str = ""
    affinity: str | None = None
    worker: WorkerState | None = None
    status: int = 0
    #: The error code the client got (``model_not_found``, ``stream_broken``...), if any.
    error: str = ""
    attempts: int = 0
    tail: bytes = b""


@dataclass(slots=True)
class _Held:
    """The start of an answer read before anything was sent (see ``hold_back_bytes``)."""

    chunks: AsyncIterator[bytes]
    parts: list[bytes] = field(default_factory=list)
    complete: bool = False


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
            service_capacity=self._capacity,
            affinity_load_factor=settings.affinity_load_factor,
            priority_aging=settings.queue_priority_aging,
        )
        #: Local per coordinator; with Redis, ``mount`` puts the shared one here.
        self.limiter: RateLimiter = RateLimiter()
        self.usage = UsageRecorder(pool.engine)
        self.verifier = Verifier(self)  # coordinator/trust: re-runs and compares answers
        self.ledger = Ledger(pool.engine, settings, pool.registry.all)  # trust: the credits
        #: ``/api/services/{name}/connect`` (data services); set by ``mount``.
        self.data: DataConnections

    def _capacity(self, service: str) -> int | None:
        spec = self.pool.catalog.get(service)
        return spec.capacity if spec is not None else None

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

    def openapi_paths(self) -> dict[str, Any]:
        """The gateway's operations for ``/openapi.json``, naming what the pool serves now."""
        from rma.coordinator.gateway.openapi import paths

        catalog = self.pool.catalog
        served = [name for name in catalog if self.balancer.workers_for(name)]
        models = [
            m
            for name in served
            if (spec := catalog[name]).kind == "openai" or spec.endpoints
            for m in spec.models
        ]
        endpoints = {
            path: sorted({m for name in names if name in served for m in catalog[name].models})
            for path, names in catalog.endpoints().items()
            if path not in OPENAI_PATHS  # documented already (and routed by model anyway)
        }
        return paths(models, served, endpoints)

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
        data: list[dict[str, object]] = []
        seen: set[str] = set()
        for name, spec in self.pool.catalog.items():
            if (spec.kind != "openai" and not spec.endpoints) or not self.balancer.workers_for(
                name
            ):
                continue
            for m in spec.models:
                if m in seen:  # several services list it: one entry, under the first healthy one
                    continue
                seen.add(m)
                data.append(
                    {
                        "id": m,
                        "object": "model",
                        "created": 0,
                        "owned_by": "rma",
                        "service": name,
                        "task": spec.task,
                    }
                )
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
        await self._answer(call, scope, send, self._openai(call, scope, receive, send))

    async def service(self, scope: Scope, receive: Receive, send: Send) -> None:
        """``ANY /api/services/{service}/{path}``: any other service, by name."""
        call = _Call(time.perf_counter())
        await self._answer(call, scope, send, self._service(call, scope, receive, send))

    async def endpoint(self, scope: Scope, receive: Receive, send: Send) -> None:
        """``POST /v1/{path}``: an endpoint that catalog entries declare (``endpoints``), routed
        by the body's ``model`` (a JSON field or a form field) to a service declaring it."""
        call = _Call(time.perf_counter())
        await self._answer(call, scope, send, self._endpoint(call, scope, receive, send))

    async def _answer(
        self, call: _Call, scope: Scope, send: Send, work: Coroutine[Any, Any, None]
    ) -> None:
        """Run one request's ``work``: its refusal as a JSON error, its accounting always."""
        try:
            await work
        except APIError as exc:
            call.status, call.error = exc.status, exc.code
            await send_error(send, exc.status, exc.code, exc.message, exc.headers)
        except ClientGone:
            too_large = scope.get("rma.body_too_large")
            call.status = 413 if too_large else 499
            call.error = "body_too_large" if too_large else "client_gone"
        finally:
            self._done(call)

    async def _openai(self, call: _Call, scope: Scope, receive: Receive, send: Send) -> None:
        call.key = await self.authenticate(scope)
        await self._rate_limit(call)
        body = await read_body(receive)
        call.service, call.affinity = self._route_body(scope, body)
        self._check_scope(call)
        qs = scope.get("query_string", b"")
        path = scope["path"] + ("?" + qs.decode("latin-1") if qs else "")
        await self._forward(call, scope, receive, send, path, body)

    async def _service(self, call: _Call, scope: Scope, receive: Receive, send: Send) -> None:
        call.key = await self.authenticate(scope)
        name = scope["path_params"]["service"]
        if name not in self.pool.catalog:
            raise APIError(404, f"no service {name!r} in the catalog", "unknown_service")
        if self.pool.catalog[name].kind == "tcp":
            raise APIError(
                400,
                f"service {name!r} speaks TCP, not HTTP: reach it with `rma connect {name}` "
                f"or a WebSocket to /api/services/{name}/connect",
                "tcp_service",
            )
        call.service = name
        self._check_scope(call)
        await self._rate_limit(call)
        body = await read_body(receive)
        prefix = f"/api/services/{name}".encode()
        raw_path: bytes = scope.get("raw_path") or scope["path"].encode()
        rest = raw_path[len(prefix) :] if raw_path.startswith(prefix) else b"/"
        rest = rest.split(b"?", 1)[0] or b"/"
        qs = scope.get("query_string", b"")
        path = rest.decode("latin-1") + ("?" + qs.decode("latin-1") if qs else "")
        await self._forward(call, scope, receive, send, path, body)

    async def _endpoint(self, call: _Call, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope["path"]
        call.key = await self.authenticate(scope)  # first: no role learns the routes
        self._check_method(path, scope["method"])
        declared = self.pool.catalog.services_for_endpoint(path)
        await self._rate_limit(call)
        body = await read_body(receive)
        ctype = header(scope, b"content-type")
        content_type = ctype.decode("latin-1") if ctype else None
        model, data = body_model(content_type, body, strict=bool(declared))
        call.service = self._service_for_endpoint(path, declared, model)
        self._check_scope(call)
        if isinstance(data, dict) and model is not None:
            call.affinity = _affinity_key(scope, data, model)
        qs = scope.get("query_string", b"")
        target = path + ("?" + qs.decode("latin-1") if qs else "")
        await self._forward(call, scope, receive, send, target, body)

    def _check_method(self, path: str, method: str) -> None:
        """405 on a path the gateway serves with other methods; 404 for a method other than
        POST on any other path (POST goes on to routing)."""
        if path == "/v1/models" or path.startswith("/v1/models/"):
            allow = "GET, HEAD, OPTIONS"
        elif method == "POST":
            return
        elif path in OPENAI_PATHS or self.pool.catalog.services_for_endpoint(path):
            allow = "POST, OPTIONS"
        else:
            raise APIError(404, f"no endpoint {method} {path}", "endpoint_not_found")
        raise APIError(
            405, f"{method} is not allowed on {path}", "method_not_allowed", {"Allow": allow}
        )

    def _service_for_endpoint(self, path: str, declared: list[str], model: str | None) -> str:
        """Of the services declaring ``path``, the least loaded one serving ``model``."""
        catalog = self.pool.catalog
        serving = catalog.services_for_model(model) if model else []
        if not declared:
            message = f"no service in the catalog serves POST {path}"
            if serving:
                message += f"; the model {model!r} is served by {_services(catalog, serving)}"
            raise APIError(404, message, "endpoint_not_found")
        if model is None:
            raise APIError(
                400,
                f"POST {path} needs a 'model' (a JSON field or a form field); it is served by "
                f"{_services(catalog, declared)}",
                "no_model",
            )
        candidates = [name for name in serving if name in declared]
        if candidates:
            return self.balancer.least_loaded(candidates)
        if not serving:
            raise APIError(
                404,
                f"no service serves the model {model!r}; POST {path} is served by "
                f"{_services(catalog, declared)} (GET /v1/models lists the models)",
                "model_not_found",
            )
        raise APIError(
            404,
            f"the model {model!r} is served by {_services(catalog, serving)}, which do not "
            f"declare POST {path}; it is served by {_services(catalog, declared)}",
            "endpoint_not_found",
        )

    def _route_body(self, scope: Scope, body: bytes) -> tuple[str, str | None]:
        """The service for the body's ``model``, and the conversation's affinity key."""
        try:
            data = json.loads(body)
        except (ValueError, RecursionError):  # also invalid UTF-8, nesting past the stack
            raise APIError(400, "the request body is not valid JSON", "invalid_json") from None
        service = self._service_for(data)
        if not isinstance(data, dict):
            return service, None
        return service, _affinity_key(scope, data, str(data["model"]))

    def _service_for(self, data: object) -> str:
        """The service for a parsed body's ``model``: of several listing it, the least loaded."""
        model = data.get("model") if isinstance(data, dict) else None
        if not isinstance(model, str) or not model:
            raise APIError(400, "the request needs a 'model' (see GET /v1/models)", "no_model")
        services = self.pool.catalog.services_for_model(model)
        if not services:
            raise APIError(
                404,
                f"no service serves the model {model!r}; GET /v1/models lists the models",
                "model_not_found",
            )
        if isinstance(data, dict) and has_image_input(data):
            # images go only to a service that says this model sees them (the catalog's vision)
            services = [s for s in services if model in self.pool.catalog[s].vision]
            if not services:
                sighted = ", ".join(self.pool.catalog.vision_models()) or "none in this pool"
                raise APIError(
                    400,
                    f"the model {model!r} takes no image input; models that do: {sighted}",
                    "model_lacks_vision",
                )
        return self.balancer.least_loaded(services)

    @staticmethod
    def _check_scope(call: _Call) -> None:
        """403 unless the key may use the routed service (``rma admin keys create --services``)."""
        if call.key is not None and not call.key.allows(call.service):
            raise APIError(
                403,
                f"this API key may not use service {call.service!r} (its services: "
                f"{', '.join(sorted(call.key.services or ()))})",
                "service_not_allowed",
            )

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
        wish = _wish(scope, call.affinity if self.settings.affinity else None)
        if self.verifier.quorum_wanted(scope):  # x-rma-verify: quorum
            await self.verifier.quorum(call, request, send)
            return
        send = self.verifier.watch(call, request, send)  # verified after the client has it
        watcher = asyncio.ensure_future(_disconnected(receive))
        try:
            await self._attempts(call, request, send, deadline, watcher, trusted_only, wish)
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
        wish: Wish | None = None,
    ) -> None:
        s = self.settings
        tried: set[str] = set()
        failures: list[str] = []
        timed_out = False
        last_status: int | None = None
        while call.attempts < s.max_attempts:
            asked = time.perf_counter()
            try:
                rank = self.ledger.priority_of(call.key.owner) if call.key else 0.0
                lease = await self.balancer.acquire(call.service, tried, trusted_only, wish, rank)
            except APIError as exc:
                if exc.status == 429:  # waited in vain: the queue was full or the wait too long
                    self._waited(call, asked)
                if exc.status == 503 and failures:
                    break  # the ones that failed left routing: say why they failed
                raise
            if lease is None:
                break
            self._waited(call, asked)
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
                    if exc.unreachable:
                        self.balancer.mark_unreachable(worker)
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
                held: _Held | None = None
                if self._holds(resp):
                    try:
                        held = await self._hold_back(resp, deadline, watcher)
                    except UpstreamError as exc:  # nothing reached the client: try another
                        await _close(resp)
                        timed_out = exc.timeout
                        self._worker_failed(worker, call.service, failures, str(exc))
                        continue
                    except BaseException:
                        await _close(resp)
                        raise
                self.balancer.succeeded(worker, call.service)
                self.metrics.observe(
                    FIRST_BYTE, time.perf_counter() - call.started, (("service", call.service),)
                )
                await self._relay(call, resp, send, deadline, watcher, held)
                return
            finally:
                lease.release()
        self._give_up(call, failures, timed_out, last_status)

    def _waited(self, call: _Call, since: float) -> None:
        """Count the wait for a free slot (about 0 when a worker had one)."""
        self.metrics.observe(QUEUE_WAIT, time.perf_counter() - since, (("service", call.service),))

    def _holds(self, resp: UpstreamResponse) -> bool:
        """Whether to read the answer before sending it: not a stream, not over the limit."""
        limit = self.settings.hold_back_bytes
        if limit <= 0:
            return False
        for k, v in resp.headers:
            name = k.lower()
            if name == "content-type" and v.lower().startswith(_STREAM_TYPES):
                return False
            if name == "content-length":
                try:
                    if int(v) > limit:
                        return False
                except ValueError:
                    return False
        return True

    async def _hold_back(
        self, resp: UpstreamResponse, deadline: float, watcher: asyncio.Future[None]
    ) -> _Held:
        """Read the body up to ``hold_back_bytes``; ``UpstreamError`` when it breaks meanwhile.

        An answer that ends within the limit is ``complete``: a worker that fails before then
        is retried on another one, as if it had failed before its headers.
        """
        s = self.settings
        loop = asyncio.get_running_loop()
        loop_deadline = loop.time() + (deadline - time.perf_counter())
        held = _Held(resp.aiter_bytes().__aiter__())
        size = 0
        try:
            async with asyncio.timeout(None) as timer:
                while size <= s.hold_back_bytes:
                    timer.reschedule(min(loop.time() + s.stall_timeout, loop_deadline))
                    try:
                        chunk = await held.chunks.__anext__()
                    except StopAsyncIteration:
                        held.complete = True
                        break
                    if chunk:
                        held.parts.append(chunk)
                        size += len(chunk)
                    if watcher.done():
                        raise ClientGone
        except TimeoutError:
            raise UpstreamError(
                f"the body stalled: nothing for {s.stall_timeout:g} s", timeout=True
            ) from None
        except UpstreamError as exc:
            raise UpstreamError(f"the body broke: {exc}", timeout=exc.timeout) from None
        return held

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
        held: _Held | None = None,
    ) -> None:
        """Stream the answer back as it comes; a broken SSE stream ends with an ``error`` event.

        ``held``: the part of the body read already (all of it when ``complete``).
        """
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
            if held is not None:
                data = b"".join(held.parts)
                call.tail = data[-_TAIL:]
                more = not held.complete
                await send({"type": "http.response.body", "body": data, "more_body": more})
                if not more:
                    return
            error, code = await self._pump(
                call, resp, send, deadline, watcher, held.chunks if held else None
            )
        finally:
            with contextlib.suppress(Exception):
                await resp.aclose()
        if error is None:
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        self.metrics.inc(BROKEN, (("service", call.service),))
        call.status = 502 if code != "stream_timeout" else 504
        call.error = code
        log.warning("gateway: stream from %s broke: %s", worker.name if worker else "?", error)
        if sse:  # one error event, then the end of a properly finished response
            await send(
                {"type": "http.response.body", "body": sse_error(code, error), "more_body": True}
            )
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
        chunks: AsyncIterator[bytes] | None = None,
    ) -> tuple[str | None, str]:
        stall = self.settings.stall_timeout
        loop = asyncio.get_running_loop()
        # perf_counter deadline -> loop clock
        loop_deadline = loop.time() + (deadline - time.perf_counter())
        if chunks is None:
            chunks = resp.aiter_bytes().__aiter__()
        tail = call.tail
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
        if status >= 400:
            code = call.error or (WORKER_ERROR if call.worker is not None else "internal_error")
            self.metrics.inc(ERRORS, (("service", service), ("code", code)))
        if not call.service:
            return  # rejected before routing (auth, bad body): nothing to account to a service
        if status < 400 and call.worker is not None and call.service in self.pool.catalog:
            weight = self.pool.catalog[call.service].credit_weight
            self.ledger.record(call.worker, call.key.id if call.key else None, call.service,
                               elapsed, weight)  # fmt: skip
        prompt, completion = tokens_in(call.tail)
        if status == 200 and call.worker is not None:  # chat: canaries, speed suspicion
            self.verifier.canaries.served(call.worker, call.service, elapsed, completion)
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


async def _close(resp: UpstreamResponse) -> None:
    with contextlib.suppress(Exception):
        await resp.aclose()  # the upstream connection or tunnel stream is never leaked


async def _disconnected(receive: Receive) -> None:
    """Returns when the client disconnects (the request body was read already)."""
    while True:
        message: Message = await receive()
        if message["type"] == "http.disconnect":
            return
