"""`rag`: ingest documents (chunk, embed via the pool, store); answer questions with citations."""

from __future__ import annotations

import re
import time
import uuid
from pathlib import Path
from typing import Annotated, Any

from fastapi import FastAPI, Query, Request, Response
from pydantic import BaseModel, Field

from rma.services._common import (
    Gateway,
    ServiceError,
    create_service_app,
    read_upload,
    require,
    run_sync,
)
from rma.services.settings import ServiceSettings
from rma.services.store import Document, RagStore
from rma.services.store_select import StoreChoice

SYSTEM_PROMPT = (
    "Answer the question using only the numbered sources. Cite the sources you use like [1]. "
    "If the sources do not hold the answer, say that you do not know. Be brief."
)

_ID = r"^[A-Za-z0-9._:-]{1,128}$"


class DocumentIn(BaseModel):
    """A document to ingest; the same `id` again replaces it."""

    text: Annotated[str, Field(min_length=1, description="The document's text.")]
    title: Annotated[str | None, Field(max_length=500, description="Shown in citations.")] = None
    id: Annotated[str | None, Field(pattern=_ID, description="Your id; unset: a new one.")] = None
    metadata: Annotated[dict[str, Any], Field(description="Kept and returned as is.")] = {}


class SearchIn(BaseModel):
    """A retrieval query."""

    query: Annotated[str, Field(min_length=1)]
    top_k: Annotated[int | None, Field(gt=0, le=50)] = None


class QueryIn(BaseModel):
    """A question to answer from the ingested documents."""

    question: Annotated[str, Field(min_length=1)]
    top_k: Annotated[int | None, Field(gt=0, le=20)] = None
    model: Annotated[str | None, Field(description="Chat model; unset: RMA_CHAT_MODEL.")] = None
    max_tokens: Annotated[int | None, Field(gt=0, le=4096)] = None


def chunk_text(text: str, size: int, overlap: int) -> list[str]:
    """Split `text` into chunks of about `size` characters on sentence boundaries."""
    sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+|\n\s*\n", text) if s.strip()]
    pieces = [s[i : i + size] for s in sentences for i in range(0, len(s), size)]
    chunks: list[str] = []
    current = ""
    for piece in pieces:
        if current and len(current) + 1 + len(piece) > size:
            chunks.append(current)
            keep = min(overlap, len(current) // 2)
            tail = current[len(current) - keep :] if keep else ""
            tail = tail.split(" ", 1)[1] if " " in tail else ""  # start on a whole word
            current = f"{tail} {piece}".strip() if tail else piece
        else:
            current = f"{current} {piece}".strip()
    if current:
        chunks.append(current)
    return chunks


def _local(folder: Path) -> RagStore:
    from rma.services.store_local import LocalRagStore

    return LocalRagStore(folder)


def _postgres(dsn: str, schema: str) -> RagStore:
    from rma.services.store_postgres import PostgresRagStore

    return PostgresRagStore(dsn, schema)


def hand_up(local: RagStore, remote: RagStore) -> int:
    """Move the local store's documents into ``remote`` (those whose ids it lacks)."""
    docs = local.export()
    added = remote.adopt(docs)
    for doc in docs:
        local.delete_document(doc.id)
    return added


def store_choice(settings: ServiceSettings) -> StoreChoice[RagStore]:
    """Where rag keeps its documents (``RMA_SERVICE_STORE``)."""
    folder = settings.service_data_dir
    return StoreChoice(
        settings,
        "rag",
        local=lambda: _local(folder),
        local_path=folder / "rag.sqlite3",
        postgres=_postgres,
        hand_up=hand_up,
    )


def create_app(settings: ServiceSettings) -> FastAPI:
    """The rag service's app."""
    require("numpy", "multipart")
    gateway = Gateway(settings)
    stores = store_choice(settings)

    async def shutdown() -> None:
        await gateway.aclose()
        await stores.aclose()

    app, _ = create_service_app(
        "rag",
        settings,
        on_startup=stores.start,
        on_shutdown=shutdown,
        health_info=lambda: {"store": stores.describe()},
    )

    async def ingest(doc: DocumentIn) -> dict[str, Any]:
        if len(doc.text) > settings.max_text_chars:
            raise ServiceError(413, "too_large", f"text over {settings.max_text_chars} characters")
        chunks = chunk_text(doc.text, settings.rag_chunk_chars, settings.rag_chunk_overlap)
        if not chunks:
            raise ServiceError(422, "invalid_request", "the document has no text")
        vectors = await gateway.embed(settings.embedding_model, chunks)
        record = Document(
            id=doc.id or uuid.uuid4().hex,
            title=doc.title or doc.text.strip().splitlines()[0][:80],
            metadata=doc.metadata,
            characters=len(doc.text),
            created_at=time.time(),
            chunks=list(zip(chunks, vectors, strict=True)),
        )
        async with stores.use() as store:
            stored: dict[str, Any] = await run_sync(store.put_document, record)
        return stored

    async def retrieve(query: str, top_k: int) -> list[dict[str, Any]]:
        (vector,) = await gateway.embed(settings.embedding_model, [query])
        async with stores.use() as store:
            found: list[dict[str, Any]] = await run_sync(store.search, vector, top_k)
        return found

    @app.post("/documents", status_code=201)
    async def add_document(body: DocumentIn) -> dict[str, Any]:
        return await ingest(body)

    @app.post("/documents/upload", status_code=201)
    async def upload_document(
        request: Request,
        title: Annotated[str | None, Query(max_length=500)] = None,
        id: Annotated[str | None, Query(pattern=_ID)] = None,
    ) -> dict[str, Any]:
        """A PDF, DOCX or text file: its text comes from the pool's `doc` service."""
        data, filename, kind = await read_upload(request)
        files = {"file": (filename or "upload", data, kind)}
        extracted = await gateway.service("doc", "extract", files=files)
        text = str(extracted.get("text") or "")
        if not text.strip():
            raise ServiceError(422, "invalid_document", "no text could be read from the file")
        meta = {"filename": filename, "format": extracted.get("format")}
        return await ingest(DocumentIn(text=text, title=title or filename, id=id, metadata=meta))

    @app.get("/documents")
    async def list_documents() -> dict[str, Any]:
        async with stores.use() as store:
            return {"documents": await run_sync(store.list_documents)}

    @app.get("/documents/{doc_id}")
    async def get_document(doc_id: str) -> dict[str, Any]:
        async with stores.use() as store:
            found: dict[str, Any] | None = await run_sync(store.get_document, doc_id)
        if found is None:
            raise ServiceError(404, "not_found", f"no document {doc_id!r}")
        return found

    @app.delete("/documents/{doc_id}", status_code=204)
    async def delete_document(doc_id: str) -> Response:
        async with stores.use() as store:
            deleted = await run_sync(store.delete_document, doc_id)
        if not deleted:
            raise ServiceError(404, "not_found", f"no document {doc_id!r}")
        return Response(status_code=204)

    @app.post("/search")
    async def search(body: SearchIn) -> dict[str, Any]:
        return {"results": await retrieve(body.query, body.top_k or settings.rag_top_k)}

    @app.post("/query")
    async def query(body: QueryIn) -> dict[str, Any]:
        model = body.model or settings.chat_model
        sources = await retrieve(body.question, body.top_k or settings.rag_top_k)
        if not sources:
            answer = "I do not know: no documents have been ingested yet."
            return {"answer": answer, "citations": [], "model": model}
        context = "\n\n".join(
            f"[{n}] ({s['title']}) {s['text']}" for n, s in enumerate(sources, start=1)
        )
        messages = [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": f"Sources:\n{context}\n\nQuestion: {body.question}"},
        ]
        max_tokens = body.max_tokens or settings.rag_max_tokens
        answer = await gateway.chat(model, messages, temperature=0, max_tokens=max_tokens)
        citations = [
            {"n": n, **s, "cited": f"[{n}]" in answer} for n, s in enumerate(sources, start=1)
        ]
        return {"answer": answer.strip(), "citations": citations, "model": model}

    return app
