"""`notes`: store notes and find them again by meaning (embeddings through the pool)."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Annotated, Any

from fastapi import FastAPI, Query, Response
from pydantic import BaseModel, Field

from rma.services._common import Gateway, ServiceError, create_service_app, require, run_sync
from rma.services.settings import ServiceSettings
from rma.services.store import Note, NotesStore
from rma.services.store_select import StoreChoice


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


def _local(folder: Path) -> NotesStore:
    from rma.services.store_local import LocalNotesStore

    return LocalNotesStore(folder)


def _postgres(dsn: str, schema: str) -> NotesStore:
    from rma.services.store_postgres import PostgresNotesStore

    return PostgresNotesStore(dsn, schema)


def hand_up(local: NotesStore, remote: NotesStore) -> int:
    """Move the local store's notes into ``remote`` (those whose ids it lacks)."""
    notes = local.export()
    added = remote.adopt(notes)
    for note in notes:
        local.delete_note(note.id)
    return added


def store_choice(settings: ServiceSettings) -> StoreChoice[NotesStore]:
    """Where notes keeps its notes (``RMA_SERVICE_STORE``)."""
    folder = settings.service_data_dir
    return StoreChoice(
        settings,
        "notes",
        local=lambda: _local(folder),
        local_path=folder / "notes.sqlite3",
        postgres=_postgres,
        hand_up=hand_up,
    )


def create_app(settings: ServiceSettings) -> FastAPI:
    """The notes service's app."""
    require("numpy")
    gateway = Gateway(settings)
    stores = store_choice(settings)

    async def shutdown() -> None:
        await gateway.aclose()
        await stores.aclose()

    app, _ = create_service_app(
        "notes",
        settings,
        on_startup=stores.start,
        on_shutdown=shutdown,
        health_info=lambda: {"store": stores.describe()},
    )

    async def find(note_id: str) -> Note:
        async with stores.use() as store:
            note: Note | None = await run_sync(store.get_note, note_id)
        if note is None:
            raise ServiceError(404, "not_found", f"no note {note_id!r}")
        return note

    async def save(note_id: str, body: NoteIn, created_at: float) -> dict[str, Any]:
        if len(body.text) > settings.max_text_chars:
            raise ServiceError(413, "too_large", f"text over {settings.max_text_chars} characters")
        content = f"{body.title}\n{body.text}" if body.title else body.text
        (vector,) = await gateway.embed(settings.embedding_model, [content])
        note = Note(note_id, body.title, body.text, body.tags, created_at, time.time(), vector)
        async with stores.use() as store:
            await run_sync(store.put_note, note)
        return (await find(note_id)).public()

    @app.post("/notes", status_code=201)
    async def create_note(body: NoteIn) -> dict[str, Any]:
        return await save(uuid.uuid4().hex, body, time.time())

    @app.get("/notes")
    async def list_notes(
        tag: Annotated[str | None, Query()] = None,
        limit: Annotated[int, Query(gt=0, le=1000)] = 100,
    ) -> dict[str, Any]:
        async with stores.use() as store:
            notes: list[Note] = await run_sync(store.list_notes, tag, limit)
        return {"notes": [n.public() for n in notes]}

    @app.get("/notes/{note_id}")
    async def get_note(note_id: str) -> dict[str, Any]:
        return (await find(note_id)).public()

    @app.put("/notes/{note_id}")
    async def replace_note(note_id: str, body: NoteIn) -> dict[str, Any]:
        old = await find(note_id)
        return await save(note_id, body, old.created_at)

    @app.delete("/notes/{note_id}", status_code=204)
    async def delete_note(note_id: str) -> Response:
        async with stores.use() as store:
            deleted = await run_sync(store.delete_note, note_id)
        if not deleted:
            raise ServiceError(404, "not_found", f"no note {note_id!r}")
        return Response(status_code=204)

    @app.post("/search")
    async def search(body: SearchIn) -> dict[str, Any]:
        (vector,) = await gateway.embed(settings.embedding_model, [body.query])
        async with stores.use() as store:
            best = await run_sync(store.search, vector, body.top_k, body.tag)
        return {"results": [{"note": note.public(), "score": score} for note, score in best]}

    return app
