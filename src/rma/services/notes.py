"""`notes`: store notes and find them again by meaning (embeddings through the pool)."""

from __future__ import annotations

import json
import time
import uuid
from typing import Annotated, Any

from fastapi import FastAPI, Query, Response
from pydantic import BaseModel, Field

from rma.services._common import Gateway, ServiceError, create_service_app, require, run_sync
from rma.services._vectors import Database, rank, to_blob
from rma.services.settings import ServiceSettings

SCHEMA = """
CREATE TABLE IF NOT EXISTS notes (
    id TEXT PRIMARY KEY, title TEXT, text TEXT NOT NULL, tags TEXT NOT NULL,
    created_at REAL NOT NULL, updated_at REAL NOT NULL, vector BLOB NOT NULL);
"""


class NoteIn(BaseModel):
    """A note to store (or, with PUT, to replace one)."""

    text: Annotated[str, Field(min_length=1, description="The note's text.")]
    title: Annotated[str | None, Field(max_length=500)] = None
    tags: Annotated[
        list[Annotated[str, Field(min_length=1, max_length=64)]], Field(max_length=32)
    ] = []


class SearchIn(BaseModel):
    """Find notes by meaning."""

    query: Annotated[str, Field(min_length=1)]
    top_k: Annotated[int, Field(gt=0, le=100)] = 5
    tag: Annotated[str | None, Field(description="Only notes with this tag.")] = None


def _note(row: Any) -> dict[str, Any]:
    return {
        "id": row["id"],
        "title": row["title"],
        "text": row["text"],
        "tags": json.loads(row["tags"]),
        "created_at": row["created_at"],
        "updated_at": row["updated_at"],
    }


def create_app(settings: ServiceSettings) -> FastAPI:
    """The notes service's app."""
    require("numpy")
    gateway = Gateway(settings)
    db = Database(settings.service_data_dir / "notes.sqlite3", SCHEMA)

    async def shutdown() -> None:
        await gateway.aclose()
        db.close()

    app, _ = create_service_app("notes", settings, on_shutdown=shutdown)

    async def find(note_id: str) -> Any:
        rows = await run_sync(db.query, "SELECT * FROM notes WHERE id = ?", (note_id,))
        if not rows:
            raise ServiceError(404, "not_found", f"no note {note_id!r}")
        return rows[0]

    async def save(note_id: str, body: NoteIn, created_at: float) -> dict[str, Any]:
        if len(body.text) > settings.max_text_chars:
            raise ServiceError(413, "too_large", f"text over {settings.max_text_chars} characters")
        content = f"{body.title}\n{body.text}" if body.title else body.text
        (vector,) = await gateway.embed(settings.embedding_model, [content])
        row = (note_id, body.title, body.text, json.dumps(body.tags), created_at, time.time())

        def store() -> None:
            with db.transaction() as conn:
                conn.execute(
                    "INSERT OR REPLACE INTO notes VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (*row, to_blob(vector)),
                )

        await run_sync(store)
        return _note(await find(note_id))

    @app.post("/notes", status_code=201)
    async def create_note(body: NoteIn) -> dict[str, Any]:
        return await save(uuid.uuid4().hex, body, time.time())

    @app.get("/notes")
    async def list_notes(
        tag: Annotated[str | None, Query()] = None,
        limit: Annotated[int, Query(gt=0, le=1000)] = 100,
    ) -> dict[str, Any]:
        rows = await run_sync(db.query, "SELECT * FROM notes ORDER BY created_at DESC")
        notes = [_note(r) for r in rows]
        if tag is not None:
            notes = [n for n in notes if tag in n["tags"]]
        return {"notes": notes[:limit]}

    @app.get("/notes/{note_id}")
    async def get_note(note_id: str) -> dict[str, Any]:
        return _note(await find(note_id))

    @app.put("/notes/{note_id}")
    async def replace_note(note_id: str, body: NoteIn) -> dict[str, Any]:
        old = await find(note_id)
        return await save(note_id, body, old["created_at"])

    @app.delete("/notes/{note_id}", status_code=204)
    async def delete_note(note_id: str) -> Response:
        def delete() -> int:
            with db.transaction() as conn:
                return conn.execute("DELETE FROM notes WHERE id = ?", (note_id,)).rowcount

        if not await run_sync(delete):
            raise ServiceError(404, "not_found", f"no note {note_id!r}")
        return Response(status_code=204)

    @app.post("/search")
    async def search(body: SearchIn) -> dict[str, Any]:
        (vector,) = await gateway.embed(settings.embedding_model, [body.query])
        rows = await run_sync(db.query, "SELECT * FROM notes")
        if body.tag is not None:
            rows = [r for r in rows if body.tag in json.loads(r["tags"])]
        best = await run_sync(rank, vector, [r["vector"] for r in rows], body.top_k)
        return {"results": [{"note": _note(rows[i]), "score": score} for i, score in best]}

    return app
