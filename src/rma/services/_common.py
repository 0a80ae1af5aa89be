"""What every built-in service shares: app factory, health, errors, the gateway client."""

from __future__ import annotations

import asyncio
import importlib.util
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from rma import __version__, install_hint
from rma.services.settings import ServiceSettings

_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    502: "upstream_error",
    503: "unavailable",
}


LOCAL_EXTRA = f"install the `local` extra: {install_hint('local')}"


def require(*modules: str) -> None:
    """Raise ImportError (without importing anything) unless every module is installed."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(f"missing {', '.join(missing)}: {LOCAL_EXTRA}")


class ServiceError(Exception):
    """An error answered as `{"error": {"code", "message"}}` with `status`."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def error_response(status: int, code: str, message: str) -> JSONResponse:
    """The JSON error shape of the whole product."""
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


def validation_message(errors: Sequence[Any]) -> str:
    """One line out of pydantic's validation errors."""
    parts = []
    for err in errors:
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        parts.append(f"{loc}: {err.get('msg')}" if loc else str(err.get("msg")))
    return "; ".join(parts) or "invalid request"


def install_error_handlers(app: FastAPI) -> None:
    """Answer every error, including FastAPI's own, in the product's JSON shape."""

    async def on_service_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ServiceError)
        return error_response(exc.status, exc.code, exc.message)

    async def on_validation(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return error_response(422, "invalid_request", validation_message(exc.errors()))

    async def on_http(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        code = _CODES.get(exc.status_code, "error")
        return error_response(exc.status_code, code, str(exc.detail))

    app.add_exception_handler(ServiceError, on_service_error)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)


class BodyTooLarge(Exception):
    pass


async def read_body(receive: Receive, max_bytes: int | None = None) -> bytes | None:
    """The whole request body; ``None`` when the client went away first."""
    chunks: list[bytes] = []
    size = 0
    more = True
    while more:
        message = await receive()
        if message["type"] != "http.request":
            return None
        chunk = message.get("body", b"")
        chunks.append(chunk)
        size += len(chunk)
        more = message.get("more_body", False)
        if max_bytes is not None and size > max_bytes:
            raise BodyTooLarge
    return b"".join(chunks)


def replaying(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that hands the app ``body`` (already read) first, then the real messages."""
    replayed = False

    async def replay() -> Message:
        nonlocal replayed
        if not replayed:
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


class BodyLimit:
    """ASGI middleware: 413 for a request body over `max_bytes` (declared or streamed).

    It reads the body before the app runs, so the app never sees a partial one.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_large = error_response(413, "too_large", f"request body over {self.max_bytes} bytes")
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > self.max_bytes:
                await too_large(scope, receive, send)
                return
        try:
            body = await read_body(receive, self.max_bytes)
        except BodyTooLarge:
            await too_large(scope, receive, send)
            return
        if body is None:
            return  # the client went away
        await self.app(scope, replaying(body, receive), send)


class Readiness:
    """Loads a service's model in a background thread; `/health` reports on it."""

    def __init__(self) -> None:
        self.ready = False
        self.error: str | None = None
        self._done = threading.Event()

    def start(self, load: Callable[[], None]) -> None:
        def run() -> None:
            try:
                load()
                self.ready = True
            except Exception as exc:  # reported by /health, never raised into a request
                self.error = f"{type(exc).__name__}: {exc}"
            finally:
                self._done.set()

        threading.Thread(target=run, name="rma-service-load", daemon=True).start()

    def check(self) -> None:
        """Raise 503 unless the model is loaded."""
        if not self.ready:
            raise ServiceError(503, "not_ready", self.error or "the service is still loading")


def create_service_app(
    name: str,
    settings: ServiceSettings,
    *,
    load: Callable[[], None] | None = None,
    on_startup: Callable[[], Awaitable[None]] | None = None,
    on_shutdown: Callable[[], Awaitable[None]] | None = None,
    health_info: Callable[[], dict[str, Any]] | None = None,
) -> tuple[FastAPI, Readiness]:
    """A FastAPI app with `/health`, JSON errors and a body limit; `load` runs in the background.

    `health_info` adds fields to every `/health` answer (rag and notes: their `store`).
    """
    readiness = Readiness()

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        readiness.start(load or (lambda: None))
        if on_startup is not None:
            await on_startup()
        yield
        if on_shutdown is not None:
            await on_shutdown()

    app = FastAPI(title=f"rma {name}", version=__version__, lifespan=lifespan)
    install_error_handlers(app)
    app.add_middleware(BodyLimit, max_bytes=int(settings.max_request_mb * 1024 * 1024))

    @app.get("/health", tags=["health"])
    async def health() -> JSONResponse:
        extra = health_info() if health_info is not None else {}
        if readiness.ready:
            return JSONResponse({"status": "ok", "service": name, **extra})
        status = "error" if readiness.error else "loading"
        body = {"status": status, "service": name, "detail": readiness.error, **extra}
        return JSONResponse(body, status_code=503)

    return app, readiness


async def run_sync(func: Callable[..., Any], *args: Any) -> Any:
    """Run blocking model code off the event loop."""
    return await asyncio.to_thread(func, *args)


class Gateway:
    """Calls other services through the coordinator's gateway (never directly)."""

    def __init__(
        self, settings: ServiceSettings, transport: httpx.AsyncBaseTransport | None = None
    ):
        headers = {"user-agent": f"rma-service/{__version__}"}
        if settings.api_key is not None:
            headers["authorization"] = f"Bearer {settings.api_key.get_secret_value()}"
        self._key_file = settings.api_key_file
        self._client = httpx.AsyncClient(
            base_url=settings.gateway_url.rstrip("/"),
            headers=headers,
            timeout=settings.gateway_timeout,
            transport=transport,
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    def _key_header(self) -> dict[str, str]:
        """The key in RMA_API_KEY_FILE as it is now (a re-joined worker rewrites it)."""
        if self._key_file is None:
            return {}
        try:
            key = self._key_file.read_text().strip()
        except OSError:
            return {}
        return {"authorization": f"Bearer {key}"} if key else {}

    async def request(self, method: str, path: str, **kwargs: Any) -> Any:
        """Send one request; answer its JSON, or raise ServiceError 502/503."""
        try:
            headers = {**self._key_header(), **kwargs.pop("headers", {})}
            response = await self._client.request(method, path, headers=headers, **kwargs)
        except httpx.HTTPError as exc:
            raise ServiceError(
                503, "gateway_unreachable", f"gateway call {path} failed: {exc!r}"
            ) from exc
        if response.status_code >= 400:
            detail = response.text[:500]
            raise ServiceError(
                502, "upstream_error", f"gateway {path} answered {response.status_code}: {detail}"
            )
        try:
            return response.json()
        except ValueError as exc:
            raise ServiceError(502, "upstream_error", f"gateway {path} sent no JSON") from exc

    async def embed(self, model: str, texts: list[str]) -> list[list[float]]:
        """Embeddings of `texts`, in order."""
        body = await self.request("POST", "/v1/embeddings", json={"model": model, "input": texts})
        data = sorted(body["data"], key=lambda item: item["index"])
        return [item["embedding"] for item in data]

    async def chat(self, model: str, messages: list[dict[str, str]], **options: Any) -> str:
        """The assistant's reply to `messages`."""
        payload = {"model": model, "messages": messages, "stream": False, **options}
        body = await self.request("POST", "/v1/chat/completions", json=payload)
        return str(body["choices"][0]["message"]["content"] or "")

    async def service(self, service: str, path: str, **kwargs: Any) -> Any:
        """Call any other service under `/api/services/<service>/<path>`."""
        return await self.request("POST", f"/api/services/{service}/{path.lstrip('/')}", **kwargs)


async def read_upload(request: Request) -> tuple[bytes, str | None, str]:
    """The uploaded file: multipart field `file`, or the raw body. Returns data, name, type."""
    content_type = request.headers.get("content-type", "application/octet-stream")
    if content_type.startswith("multipart/form-data"):
        async with request.form() as form:
            upload = form.get("file")
            if upload is None or isinstance(upload, str):
                raise ServiceError(
                    422, "invalid_request", "multipart body needs a file field `file`"
                )
            data = await upload.read()
            name, kind = upload.filename, upload.content_type or "application/octet-stream"
    else:
        data, name, kind = await request.body(), None, content_type.split(";")[0].strip()
    if not data:
        raise ServiceError(400, "empty_body", "send a file: multipart field `file` or a raw body")
    return data, name, kind
