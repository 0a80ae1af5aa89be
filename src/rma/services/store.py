"""The stores of rag and notes: what each keeps, behind one small interface per service.

Two kinds implement them: ``local`` (SQLite in the service's own folder, ``store_local``) and
``postgres`` (the data tier's PostgreSQL, or any DSN, ``store_postgres``).  Which one a service
uses is decided in ``store_select``.  Every method is blocking: services call them through
``run_sync``.  Vectors go in as given and are kept at unit length; a score is the cosine
similarity, rounded to 6 places.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


class StoreUnavailable(Exception):
    """The store cannot be reached now (its database went away); the request may be retried."""


@dataclass(frozen=True, slots=True)
class Document:
    """A rag document with its chunks (text and vector, in order)."""

    id: str
    title: str
    metadata: dict[str, Any]
    characters: int
    created_at: float
    chunks: Sequence[tuple[str, Sequence[float]]] = field(default=())


@dataclass(frozen=True, slots=True)
class Note:
    """A note and the vector of its title and text."""

    id: str
    title: str | None
    text: str
    tags: list[str]
    created_at: float
    updated_at: float
    vector: Sequence[float] = field(default=())

    def public(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "title": self.title,
            "text": self.text,
            "tags": self.tags,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
        }


class Store(ABC):
    """What every store has: a kind, a description for ``/health``, and ``close``."""

    kind: str = ""

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """What ``/health`` shows under ``store`` (never a password)."""

    @abstractmethod
    def close(self) -> None: ...


class RagStore(Store):
    """rag's documents and chunks."""

    @abstractmethod
    def put_document(self, doc: Document) -> dict[str, Any]:
        """Store ``doc`` (replacing one with its id); answer it as ``get_document`` does."""

    @abstractmethod
    def get_document(self, doc_id: str) -> dict[str, Any] | None:
        """``{id, title, metadata, characters, chunks, created_at}`` (chunks: their count)."""

    @abstractmethod
    def list_documents(self) -> list[dict[str, Any]]:
        """Every document, oldest first."""

    @abstractmethod
    def delete_document(self, doc_id: str) -> bool:
        """Delete it and its chunks; False when there was none."""

    @abstractmethod
    def search(self, vector: Sequence[float], k: int) -> list[dict[str, Any]]:
        """The ``k`` nearest chunks: ``{document_id, title, chunk, text, score}``, best first."""

    @abstractmethod
    def export(self) -> list[Document]:
        """Every document with its chunks and vectors (to hand them to another store)."""

    @abstractmethod
    def adopt(self, docs: Sequence[Document]) -> int:
        """Add the documents whose ids are not here yet; answer how many were added."""


class NotesStore(Store):
    """notes' notes."""

    @abstractmethod
    def put_note(self, note: Note) -> None:
        """Store ``note`` (replacing one with its id)."""

    @abstractmethod
    def get_note(self, note_id: str) -> Note | None: ...

    @abstractmethod
    def list_notes(self, tag: str | None, limit: int) -> list[Note]:
        """Newest first; only those tagged ``tag`` when it is set."""

    @abstractmethod
    def delete_note(self, note_id: str) -> bool: ...

    @abstractmethod
    def search(self, vector: Sequence[float], k: int, tag: str | None) -> list[tuple[Note, float]]:
        """The ``k`` nearest notes and their scores, best first."""

    @abstractmethod
    def export(self) -> list[Note]:
        """Every note with its vector."""

    @abstractmethod
    def adopt(self, notes: Sequence[Note]) -> int:
        """Add the notes whose ids are not here yet; answer how many were added."""
