"""``local`` stores: SQLite files in the service's own folder (float32 blobs, ranked with numpy)."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rma.services._vectors import Database, rank, to_blob
from rma.services.store import Document, Note, NotesStore, RagStore

RAG_SCHEMA = """
CREATE TABLE IF NOT EXISTS documents (
    id TEXT PRIMARY KEY, title TEXT NOT NULL, metadata TEXT NOT NULL,
    characters INTEGER NOT NULL, created_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS chunks (
    document_id TEXT NOT NULL REFERENCES documents(id) ON DELETE CASCADE,
    position INTEGER NOT NULL, text TEXT NOT NULL, vector BLOB NOT NULL,
    PRIMARY KEY (document_id, position));
"""

NOTES_SCHEMA = """
CREATE TABLE IF NOT EXISTS notes (
    id TEXT PRIMARY KEY, title TEXT, text TEXT NOT NULL, tags TEXT NOT NULL,
    created_at REAL NOT NULL, updated_at REAL NOT NULL, vector BLOB NOT NULL);
"""

_DOCUMENTS = (
    "SELECT d.*, (SELECT COUNT(*) FROM chunks c WHERE c.document_id = d.id) AS chunks "
    "FROM documents d"
)


def _vector(blob: bytes) -> list[float]:
    return [float(x) for x in np.frombuffer(blob, dtype="<f4")]


def _document(row: Any) -> dict[str, Any]:
    return {
        "id": row["id"],
        "title": row["title"],
        "metadata": json.loads(row["metadata"]),
        "characters": row["characters"],
        "chunks": row["chunks"],
        "created_at": row["created_at"],
    }


class LocalRagStore(RagStore):
    """rag's documents in ``<folder>/rag.sqlite3``."""

    kind = "local"

    def __init__(self, folder: Path) -> None:
        self.path = folder / "rag.sqlite3"
        self.db = Database(self.path, RAG_SCHEMA)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "path": str(self.path)}

    def close(self) -> None:
        self.db.close()

    def _insert(self, conn: sqlite3.Connection, doc: Document) -> None:
        conn.execute(
            "INSERT OR REPLACE INTO documents VALUES (?, ?, ?, ?, ?)",
            (doc.id, doc.title, json.dumps(doc.metadata), doc.characters, doc.created_at),
        )
        conn.executemany(
            "INSERT INTO chunks VALUES (?, ?, ?, ?)",
            [(doc.id, i, text, to_blob(vec)) for i, (text, vec) in enumerate(doc.chunks)],
        )

    def put_document(self, doc: Document) -> dict[str, Any]:
        with self.db.transaction() as conn:
            conn.execute("DELETE FROM chunks WHERE document_id = ?", (doc.id,))
            self._insert(conn, doc)
        found = self.get_document(doc.id)
        assert found is not None
        return found

    def get_document(self, doc_id: str) -> dict[str, Any] | None:
        rows = self.db.query(f"{_DOCUMENTS} WHERE d.id = ?", (doc_id,))
        return _document(rows[0]) if rows else None

    def list_documents(self) -> list[dict[str, Any]]:
        return [_document(r) for r in self.db.query(f"{_DOCUMENTS} ORDER BY d.created_at")]

    def delete_document(self, doc_id: str) -> bool:
        with self.db.transaction() as conn:
            conn.execute("DELETE FROM chunks WHERE document_id = ?", (doc_id,))
            return bool(conn.execute("DELETE FROM documents WHERE id = ?", (doc_id,)).rowcount)

    def search(self, vector: Sequence[float], k: int) -> list[dict[str, Any]]:
        sql = "SELECT c.*, d.title FROM chunks c JOIN documents d ON d.id = c.document_id"
        rows = self.db.query(sql)
        return [
            {
                "document_id": rows[i]["document_id"],
                "title": rows[i]["title"],
                "chunk": rows[i]["position"],
                "text": rows[i]["text"],
                "score": score,
            }
            for i, score in rank(vector, [r["vector"] for r in rows], k)
        ]

    def export(self) -> list[Document]:
        chunks: dict[str, list[tuple[str, Sequence[float]]]] = {}
        for row in self.db.query("SELECT * FROM chunks ORDER BY document_id, position"):
            chunks.setdefault(row["document_id"], []).append((row["text"], _vector(row["vector"])))
        return [
            Document(
                id=row["id"],
                title=row["title"],
                metadata=json.loads(row["metadata"]),
                characters=row["characters"],
                created_at=row["created_at"],
                chunks=chunks.get(row["id"], []),
            )
            for row in self.db.query("SELECT * FROM documents ORDER BY created_at")
        ]

    def adopt(self, docs: Sequence[Document]) -> int:
        added = 0
        with self.db.transaction() as conn:
            for doc in docs:
                if conn.execute("SELECT 1 FROM documents WHERE id = ?", (doc.id,)).fetchone():
                    continue
                self._insert(conn, doc)
                added += 1
        return added


def _note(row: Any) -> Note:
    return Note(
        id=row["id"],
        title=row["title"],
        text=row["text"],
        tags=json.loads(row["tags"]),
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        vector=_vector(row["vector"]),
    )


class LocalNotesStore(NotesStore):
    """notes' notes in ``<folder>/notes.sqlite3``."""

    kind = "local"

    def __init__(self, folder: Path) -> None:
        self.path = folder / "notes.sqlite3"
        self.db = Database(self.path, NOTES_SCHEMA)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "path": str(self.path)}

    def close(self) -> None:
        self.db.close()

    def put_note(self, note: Note) -> None:
        with self.db.transaction() as conn:
            conn.execute("INSERT OR REPLACE INTO notes VALUES (?, ?, ?, ?, ?, ?, ?)", _row(note))

    def get_note(self, note_id: str) -> Note | None:
        rows = self.db.query("SELECT * FROM notes WHERE id = ?", (note_id,))
        return _note(rows[0]) if rows else None

    def _all(self, tag: str | None) -> list[Note]:
        notes = [_note(r) for r in self.db.query("SELECT * FROM notes ORDER BY created_at DESC")]
        return [n for n in notes if tag is None or tag in n.tags]

    def list_notes(self, tag: str | None, limit: int) -> list[Note]:
        return self._all(tag)[:limit]

    def delete_note(self, note_id: str) -> bool:
        with self.db.transaction() as conn:
            return bool(conn.execute("DELETE FROM notes WHERE id = ?", (note_id,)).rowcount)

    def search(self, vector: Sequence[float], k: int, tag: str | None) -> list[tuple[Note, float]]:
        notes = self._all(tag)
        best = rank(vector, [to_blob(n.vector) for n in notes], k)
        return [(notes[i], score) for i, score in best]

    def export(self) -> list[Note]:
        return self._all(None)

    def adopt(self, notes: Sequence[Note]) -> int:
        added = 0
        with self.db.transaction() as conn:
            for note in notes:
                cur = conn.execute(
                    "INSERT OR IGNORE INTO notes VALUES (?, ?, ?, ?, ?, ?, ?)", _row(note)
                )
                added += cur.rowcount
        return added


def _row(note: Note) -> tuple[Any, ...]:
    return (
        note.id,
        note.title,
        note.text,
        json.dumps(note.tags),
        note.created_at,
        note.updated_at,
        to_blob(note.vector),
    )
