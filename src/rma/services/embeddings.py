"""`embeddings`: OpenAI-compatible `/v1/embeddings` with all-MiniLM-L6-v2, on numpy (no torch)."""

from __future__ import annotations

import base64
import threading
from typing import TYPE_CHECKING, Annotated, Any, Literal

from fastapi import FastAPI
from pydantic import BaseModel, Field

from rma.services._common import ServiceError, create_service_app, require, run_sync
from rma.services.settings import ServiceSettings

if TYPE_CHECKING:
    from rma.services.bert import BertEncoder


class EmbeddingRequest(BaseModel):
    """The OpenAI embeddings request (token-id inputs are not supported)."""

    input: Annotated[str | list[str], Field(description="One text or a list of texts.")]
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, gt=0)
    user: str | None = None


class Embedder:
    """The numpy all-MiniLM-L6-v2 encoder, loaded once (weights found or fetched in `load`)."""

    def __init__(self, settings: ServiceSettings) -> None:
        self.settings = settings
        self._encoder: BertEncoder | None = None
        self._lock = threading.Lock()

    def load(self) -> None:
        from rma.services.bert import BertEncoder
        from rma.services.minilm import find_model

        settings = self.settings
        path = find_model(
            settings.embeddings_model_path,
            settings.service_data_dir,
            fetch=settings.embeddings_fetch,
        )
        self._encoder = BertEncoder(path)

    def encode(self, texts: list[str]) -> tuple[list[Any], int]:
        """Unit-length float32 vectors of `texts`, and their token count."""
        assert self._encoder is not None
        with self._lock:
            vectors, tokens = self._encoder.encode(texts)
            return list(vectors), tokens


def create_app(settings: ServiceSettings) -> FastAPI:
    """The embeddings service's app."""
    require("tokenizers", "safetensors", "numpy")
    path = settings.embeddings_model_path
    if path is not None and not path.is_dir():
        raise FileNotFoundError(f"RMA_EMBEDDINGS_MODEL_PATH {path} is not a folder")
    embedder = Embedder(settings)
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
