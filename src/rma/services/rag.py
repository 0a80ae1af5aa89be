"""`rag`: ingest documents (chunk, embed via the pool, store); answer questions with citations."""

from __future__ import annotations

import json
import re
import time
import uuid
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
from rma.services._vectors import Database, rank, to_blob
from rma.services.settings import ServiceSettings

SCHEMA = """
CREATE TABLE IF NOT EXISTS documents (
    id TEXT PRIMARY KEY, title TEXT NOT NULL, metadata TEXT NOT NULL,
    characters INTEGER NOT NULL, created_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS chunks (
    document_id TEXT NOT NULL REFERENCES documents(id) ON DELETE CASCADE,
    position INTEGER NOT NULL, text TEXT NOT NULL, vector BLOB NOT NULL,
    PRIMARY KEY (document_id, position));
"""

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


def _document(row: Any) -> dict[str, Any]:
    return {
        "id": row["id"],
        "title": row["title"],
        "metadata": json.loads(row["metadata"]),
        "characters": row["characters"],
        "chunks": row["chunks"],
        "created_at": row["created_at"],
    }


def create_app(settings: ServiceSettings) -> FastAPI:
    """The rag service's app."""
    require("numpy", "multipart")
    gateway = Gateway(settings)
    db = Database(settings.service_data_dir / "rag.sqlite3", SCHEMA)

    async def shutdown() -> None:
        await gateway.aclose()
        db.close()

    app, _ = create_service_app("rag", settings, on_shutdown=shutdown)
    documents_sql = (
        "SELECT d.*, (SELECT COUNT(*) FROM chunks c WHERE c.document_id = d.id) AS chunks "
        "FROM documents d"
    )

    async def ingest(doc: DocumentIn) -> dict[str, Any]:
        if len(doc.text) > settings.max_text_chars:
            raise ServiceError(413, "too_large", f"text over {settings.max_text_chars} characters")
        chunks = chunk_text(doc.text, settings.rag_chunk_chars, settings.rag_chunk_overlap)
        if not chunks:
            raise ServiceError(422, "invalid_request", "the document has no text")
        vectors = await gateway.embed(settings.embedding_model, chunks)
        doc_id = doc.id or uuid.uuid4().hex
        title = doc.title or doc.text.strip().splitlines()[0][:80]

        def store() -> None:
            with db.transaction() as conn:
                conn.execute("DELETE FROM chunks WHERE document_id = ?", (doc_id,))
                conn.execute(
                    "INSERT OR REPLACE INTO documents VALUES (?, ?, ?, ?, ?)",
                    (doc_id, title, json.dumps(doc.metadata), len(doc.text), time.time()),
                )
                conn.executemany(
                    "INSERT INTO chunks VALUES (?, ?, ?, ?)",
                    [
                        (doc_id, i, text, to_blob(vector))
                        for i, (text, vector) in enumerate(zip(chunks, vectors, strict=True))
                    ],
                )

        await run_sync(store)
        rows = await run_sync(db.query, f"{documents_sql} WHERE d.id = ?", (doc_id,))
        return _document(rows[0])

    async def retrieve(query: str, top_k: int) -> list[dict[str, Any]]:
        (vector,) = await gateway.embed(settings.embedding_model, [query])
        sql = "SELECT c.*, d.title FROM chunks c JOIN documents d ON d.id = c.document_id"
        rows = await run_sync(db.query, sql)
        best = await run_sync(rank, vector, [r["vector"] for r in rows], top_k)
        return [
            {
                "document_id": rows[i]["document_id"],
                "title": rows[i]["title"],
                "chunk": rows[i]["position"],
                "text": rows[i]["text"],
                "score": score,
            }
            for i, score in best
        ]

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
        rows = await run_sync(db.query, f"{documents_sql} ORDER BY d.created_at")
        return {"documents": [_document(r) for r in rows]}

    @app.get("/documents/{doc_id}")
    async def get_document(doc_id: str) -> dict[str, Any]:
        rows = await run_sync(db.query, f"{documents_sql} WHERE d.id = ?", (doc_id,))
        if not rows:
            raise ServiceError(404, "not_found", f"no document {doc_id!r}")
        return _document(rows[0])

    @app.delete("/documents/{doc_id}", status_code=204)
    async def delete_document(doc_id: str) -> Response:
        def delete() -> int:
            with db.transaction() as conn:
                conn.execute("DELETE FROM chunks WHERE document_id = ?", (doc_id,))
                return conn.execute("DELETE FROM documents WHERE id = ?", (doc_id,)).rowcount

        if not await run_sync(delete):
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
