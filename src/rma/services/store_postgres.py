"""``postgres`` stores: rag's and notes' tables in PostgreSQL, ranked inside the database.

Each service keeps its tables in a schema of its own (``rma_rag``, ``rma_notes``). Vectors are
kept at unit length, so the cosine similarity is a dot product. Where the ``vector`` extension
(pgvector) can be created, the column is a ``vector`` and the ranking is its ``<=>`` (cosine
distance); elsewhere the column is ``real[]`` and the dot product is summed over ``unnest`` in
SQL. Either way the ``ORDER BY ... LIMIT k`` runs in PostgreSQL: only ``k`` rows come back.
A table keeps the column type it was made with.

One connection per store, under a lock; a broken connection is dropped and made again at the
next call (through the data tier, that may reach a new holder), and every database failure is
:class:`StoreUnavailable` (503 to the client), never a traceback.
"""

# ruff: noqa: S608  (the only names put in SQL are schema names checked by _SCHEMA_NAME)

from __future__ import annotations

import contextlib
import json
import re
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from rma.services._vectors import unit
from rma.services.store import Document, Note, NotesStore, RagStore, StoreUnavailable

if TYPE_CHECKING:
    import psycopg

T = TypeVar("T")

_SCHEMA_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")

PGVECTOR = "vector"
PORTABLE = "real[]"


def plain_dsn(url: str) -> str:
    """SQLAlchemy's ``postgresql+psycopg://`` as libpq's ``postgresql://``."""
    return re.sub(r"^postgres(?:ql)?\+\w+://", "postgresql://", url)


def redact(dsn: str) -> str:
    """The DSN without its password."""
    return re.sub(r"://([^:/@]+):[^@]*@", r"://\1:***@", dsn)


class Connection:
    """One PostgreSQL connection, made on first use and again after it broke."""

    def __init__(self, dsn: str, schema: str, ddl: Callable[[psycopg.Connection[Any], str], str]):
        if not _SCHEMA_NAME.match(schema):
            raise ValueError(f"not a plain schema name: {schema!r}")
        self.dsn = plain_dsn(dsn)
        self.schema = schema
        self._ddl = ddl
        self._lock = threading.Lock()
        self._conn: psycopg.Connection[Any] | None = None
        #: ``vector`` (pgvector) or ``real[]``, once connected
        self.vectors: str | None = None
        self.error: str | None = None
        #: seconds idle after which a connection is pinged before use
        self.ping_after = 5.0
        self._used = 0.0

    def _open(self) -> psycopg.Connection[Any]:
        import psycopg

        conn = psycopg.connect(
            self.dsn, autocommit=True, connect_timeout=10, application_name="rma-" + self.schema
        )
        try:
            with conn.transaction():
                # two replicas of a service making the same tables at once: one waits
                conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (self.schema,))
                conn.execute(f"CREATE SCHEMA IF NOT EXISTS {self.schema}")
                self.vectors = self._ddl(conn, self.schema)
        except BaseException:
            conn.close()
            raise
        return conn

    def run(self, work: Callable[[psycopg.Connection[Any]], T]) -> T:
        """``work(conn)`` in one transaction; :class:`StoreUnavailable` when the database fails."""
        import psycopg

        with self._lock:
            try:
                self._check_idle()
                if self._conn is None or self._conn.closed or self._conn.broken:
                    self._drop()
                    self._conn = self._open()
                with self._conn.transaction():
                    result = work(self._conn)
                self._used = time.monotonic()
                self.error = None
                return result
            except psycopg.Error as exc:
                self.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}"
                if self._conn is not None and (self._conn.closed or self._conn.broken):
                    self._drop()
                raise StoreUnavailable(f"the store's PostgreSQL failed: {self.error}") from None
            except OSError as exc:
                self._drop()
                self.error = f"{type(exc).__name__}: {exc}"
                raise StoreUnavailable(f"the store's PostgreSQL failed: {self.error}") from None

    def _check_idle(self) -> None:
        """A connection idle for ``ping_after`` seconds is pinged first: one that died meanwhile
        (its holder restarted, the tunnel broke) is made again instead of failing the request."""
        import psycopg

        if self._conn is None or time.monotonic() - self._used < self.ping_after:
            return
        try:
            self._conn.execute("SELECT 1")
        except psycopg.Error:
            self._drop()

    def _drop(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):  # a broken one may fail to close: gone anyway
                self._conn.close()
            self._conn = None

    def close(self) -> None:
        with self._lock:
            self._drop()

    def describe(self, kind: str) -> dict[str, Any]:
        return {
            "kind": kind,
            "dsn": redact(self.dsn),
            "schema": self.schema,
            "vectors": self.vectors,
            "ok": self.error is None,
            "error": self.error,
        }


def vector_column(conn: psycopg.Connection[Any], schema: str, table: str) -> str:
    """The vector type of ``schema.table``: the one it has, else pgvector where it can be made."""
    import psycopg

    row = conn.execute(
        "SELECT udt_name FROM information_schema.columns "
        "WHERE table_schema = %s AND table_name = %s AND column_name = 'embedding'",
        (schema, table),
    ).fetchone()
    if row is not None:
        return PGVECTOR if row[0] == "vector" else PORTABLE
    try:
        with conn.transaction():  # a savepoint: a missing extension leaves the rest intact
            conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
    except psycopg.Error:
        return PORTABLE
    return PGVECTOR


def _param(kind: str, vector: Sequence[float]) -> Any:
    values = unit(vector)
    return "[" + ",".join(repr(v) for v in values) + "]" if kind == PGVECTOR else values


def _score_sql(kind: str, column: str) -> str:
    """SQL for the cosine similarity of ``column`` and the parameter ``%(q)s`` (unit vectors)."""
    if kind == PGVECTOR:
        return f"1 - ({column} <=> %(q)s::vector)"
    return f"(SELECT sum(a::float8 * b) FROM unnest({column}, %(q)s::real[]) AS t(a, b))"


def _dims_sql(kind: str, column: str) -> str:
    return f"vector_dims({column})" if kind == PGVECTOR else f"cardinality({column})"


def _vector_out(kind: str, value: Any) -> list[float]:
    if kind == PGVECTOR and isinstance(value, str):
        return [float(x) for x in value.strip("[]").split(",") if x]
    return [float(x) for x in value]


# --- rag -----------------------------------------------------------------------------------------


def _rag_ddl(conn: psycopg.Connection[Any], s: str) -> str:
    kind = vector_column(conn, s, "chunks")
    conn.execute(
        f"CREATE TABLE IF NOT EXISTS {s}.documents (id text PRIMARY KEY, title text NOT NULL, "
        "metadata jsonb NOT NULL, characters integer NOT NULL, "
        "created_at double precision NOT NULL)"
    )
    conn.execute(
        f"CREATE TABLE IF NOT EXISTS {s}.chunks ("
        f"document_id text NOT NULL REFERENCES {s}.documents(id) ON DELETE CASCADE, "
        f"position integer NOT NULL, text text NOT NULL, embedding {kind} NOT NULL, "
        "PRIMARY KEY (document_id, position))"
    )
    return kind


class PostgresRagStore(RagStore):
    """rag's documents in ``<schema>.documents`` and ``<schema>.chunks``."""

    kind = "postgres"

    def __init__(self, dsn: str, schema: str = "rma_rag") -> None:
        self.db = Connection(dsn, schema, _rag_ddl)
        self.db.run(lambda _: None)  # connect now: a wrong DSN fails here, not in a request

    def describe(self) -> dict[str, Any]:
        return self.db.describe(self.kind)

    def close(self) -> None:
        self.db.close()

    @property
    def _s(self) -> str:
        return self.db.schema

    def _documents_sql(self) -> str:
        s = self._s
        return (
            "SELECT d.id, d.title, d.metadata, d.characters, d.created_at, "
            f"(SELECT count(*) FROM {s}.chunks c WHERE c.document_id = d.id) AS chunks "
            f"FROM {s}.documents d"
        )

    @staticmethod
    def _document(row: Sequence[Any]) -> dict[str, Any]:
        metadata = row[2] if isinstance(row[2], dict) else json.loads(row[2])
        return {
            "id": row[0],
            "title": row[1],
            "metadata": metadata,
            "characters": row[3],
            "chunks": int(row[5]),
            "created_at": row[4],
        }

    def _insert(self, conn: psycopg.Connection[Any], doc: Document, *, replace: bool) -> bool:
        s, kind = self._s, self.db.vectors or PORTABLE
        on_conflict = (
            "DO UPDATE SET title = EXCLUDED.title, metadata = EXCLUDED.metadata, "
            "characters = EXCLUDED.characters, created_at = EXCLUDED.created_at"
            if replace
            else "DO NOTHING"
        )
        cur = conn.execute(
            f"INSERT INTO {s}.documents VALUES (%s, %s, %s::jsonb, %s, %s) "
            f"ON CONFLICT (id) {on_conflict}",
            (doc.id, doc.title, json.dumps(doc.metadata), doc.characters, doc.created_at),
        )
        if not cur.rowcount:
            return False
        if replace:
            conn.execute(f"DELETE FROM {s}.chunks WHERE document_id = %s", (doc.id,))
        cast = "::vector" if kind == PGVECTOR else "::real[]"
        with conn.cursor() as cur2:
            cur2.executemany(
                f"INSERT INTO {s}.chunks VALUES (%s, %s, %s, %s{cast})",
                [(doc.id, i, text, _param(kind, vec)) for i, (text, vec) in enumerate(doc.chunks)],
            )
        return True

    def put_document(self, doc: Document) -> dict[str, Any]:
        def work(conn: psycopg.Connection[Any]) -> dict[str, Any]:
            self._insert(conn, doc, replace=True)
            row = conn.execute(f"{self._documents_sql()} WHERE d.id = %s", (doc.id,)).fetchone()
            assert row is not None
            return self._document(row)

        return self.db.run(work)

    def get_document(self, doc_id: str) -> dict[str, Any] | None:
        sql = f"{self._documents_sql()} WHERE d.id = %s"
        row = self.db.run(lambda conn: conn.execute(sql, (doc_id,)).fetchone())
        return self._document(row) if row is not None else None

    def list_documents(self) -> list[dict[str, Any]]:
        sql = f"{self._documents_sql()} ORDER BY d.created_at, d.id"
        return [self._document(r) for r in self.db.run(lambda c: c.execute(sql).fetchall())]

    def delete_document(self, doc_id: str) -> bool:
        sql = f"DELETE FROM {self._s}.documents WHERE id = %s"  # chunks: ON DELETE CASCADE
        return bool(self.db.run(lambda conn: conn.execute(sql, (doc_id,)).rowcount))

    def search(self, vector: Sequence[float], k: int) -> list[dict[str, Any]]:
        s = self._s

        def work(conn: psycopg.Connection[Any]) -> list[Any]:
            kind = self.db.vectors or PORTABLE  # known once connected
            sql = (
                f"SELECT c.document_id, d.title, c.position, c.text, "
                f"{_score_sql(kind, 'c.embedding')} AS score "
                f"FROM {s}.chunks c JOIN {s}.documents d ON d.id = c.document_id "
                f"WHERE {_dims_sql(kind, 'c.embedding')} = %(n)s "
                "ORDER BY score DESC, c.document_id, c.position LIMIT %(k)s"
            )
            params = {"q": _param(kind, vector), "n": len(vector), "k": k}
            return conn.execute(sql, params).fetchall()

        return [
            {
                "document_id": r[0],
                "title": r[1],
                "chunk": r[2],
                "text": r[3],
                "score": round(float(r[4]), 6),
            }
            for r in self.db.run(work)
        ]

    def export(self) -> list[Document]:
        s = self._s

        def work(conn: psycopg.Connection[Any]) -> list[Document]:
            kind = self.db.vectors or PORTABLE
            chunks: dict[str, list[tuple[str, Sequence[float]]]] = {}
            rows = conn.execute(
                f"SELECT document_id, text, embedding FROM {s}.chunks "
                "ORDER BY document_id, position"
            ).fetchall()
            for doc_id, text, emb in rows:
                chunks.setdefault(doc_id, []).append((text, _vector_out(kind, emb)))
            docs = conn.execute(
                f"SELECT id, title, metadata, characters, created_at FROM {s}.documents "
                "ORDER BY created_at, id"
            ).fetchall()
            return [Document(r[0], r[1], r[2], r[3], r[4], chunks.get(r[0], [])) for r in docs]

        return self.db.run(work)

    def adopt(self, docs: Sequence[Document]) -> int:
        return self.db.run(lambda conn: sum(self._insert(conn, d, replace=False) for d in docs))


# --- notes ---------------------------------------------------------------------------------------


def _notes_ddl(conn: psycopg.Connection[Any], s: str) -> str:
    kind = vector_column(conn, s, "notes")
    conn.execute(
        f"CREATE TABLE IF NOT EXISTS {s}.notes (id text PRIMARY KEY, title text, "
        "text text NOT NULL, tags jsonb NOT NULL, created_at double precision NOT NULL, "
        f"updated_at double precision NOT NULL, embedding {kind} NOT NULL)"
    )
    return kind


class PostgresNotesStore(NotesStore):
    """notes' notes in ``<schema>.notes``."""

    kind = "postgres"

    def __init__(self, dsn: str, schema: str = "rma_notes") -> None:
        self.db = Connection(dsn, schema, _notes_ddl)
        self.db.run(lambda _: None)

    def describe(self) -> dict[str, Any]:
        return self.db.describe(self.kind)

    def close(self) -> None:
        self.db.close()

    _COLUMNS = "id, title, text, tags, created_at, updated_at, embedding"

    def _note(self, row: Sequence[Any]) -> Note:
        tags = row[3] if isinstance(row[3], list) else json.loads(row[3])
        vector = _vector_out(self.db.vectors or PORTABLE, row[6])
        return Note(row[0], row[1], row[2], tags, row[4], row[5], vector)

    def _insert(self, conn: psycopg.Connection[Any], note: Note, *, replace: bool) -> int:
        kind = self.db.vectors or PORTABLE
        cast = "::vector" if kind == PGVECTOR else "::real[]"
        on_conflict = (
            "DO UPDATE SET title = EXCLUDED.title, text = EXCLUDED.text, tags = EXCLUDED.tags, "
            "created_at = EXCLUDED.created_at, updated_at = EXCLUDED.updated_at, "
            "embedding = EXCLUDED.embedding"
            if replace
            else "DO NOTHING"
        )
        row = (note.id, note.title, note.text, json.dumps(note.tags), note.created_at)
        return conn.execute(
            f"INSERT INTO {self.db.schema}.notes VALUES (%s, %s, %s, %s::jsonb, %s, %s, %s{cast}) "
            f"ON CONFLICT (id) {on_conflict}",
            (*row, note.updated_at, _param(kind, note.vector)),
        ).rowcount

    def put_note(self, note: Note) -> None:
        self.db.run(lambda conn: self._insert(conn, note, replace=True))

    def get_note(self, note_id: str) -> Note | None:
        sql = f"SELECT {self._COLUMNS} FROM {self.db.schema}.notes WHERE id = %s"
        row = self.db.run(lambda conn: conn.execute(sql, (note_id,)).fetchone())
        return self._note(row) if row is not None else None

    def list_notes(self, tag: str | None, limit: int) -> list[Note]:
        where = "WHERE tags @> %(tag)s::jsonb" if tag is not None else ""
        sql = (
            f"SELECT {self._COLUMNS} FROM {self.db.schema}.notes {where} "
            "ORDER BY created_at DESC, id LIMIT %(limit)s"
        )
        params = {"tag": json.dumps([tag]), "limit": limit}
        return [self._note(r) for r in self.db.run(lambda c: c.execute(sql, params).fetchall())]

    def delete_note(self, note_id: str) -> bool:
        sql = f"DELETE FROM {self.db.schema}.notes WHERE id = %s"
        return bool(self.db.run(lambda conn: conn.execute(sql, (note_id,)).rowcount))

    def search(self, vector: Sequence[float], k: int, tag: str | None) -> list[tuple[Note, float]]:
        def work(conn: psycopg.Connection[Any]) -> list[Any]:
            kind = self.db.vectors or PORTABLE
            tagged = "AND tags @> %(tag)s::jsonb" if tag is not None else ""
            sql = (
                f"SELECT {self._COLUMNS}, {_score_sql(kind, 'embedding')} AS score "
                f"FROM {self.db.schema}.notes WHERE {_dims_sql(kind, 'embedding')} = %(n)s "
                f"{tagged} ORDER BY score DESC, created_at DESC LIMIT %(k)s"
            )
            params = {"q": _param(kind, vector), "n": len(vector), "k": k}
            return conn.execute(sql, {**params, "tag": json.dumps([tag])}).fetchall()

        return [(self._note(r), round(float(r[7]), 6)) for r in self.db.run(work)]

    def export(self) -> list[Note]:
        sql = f"SELECT {self._COLUMNS} FROM {self.db.schema}.notes ORDER BY created_at"
        return [self._note(r) for r in self.db.run(lambda c: c.execute(sql).fetchall())]

    def adopt(self, notes: Sequence[Note]) -> int:
        return self.db.run(lambda conn: sum(self._insert(conn, n, replace=False) for n in notes))
