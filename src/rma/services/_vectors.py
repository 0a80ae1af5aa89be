"""Vectors for the local stores: SQLite rows with float32 blobs, searched with numpy."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np


def unit(vector: Sequence[float]) -> list[float]:
    """`vector` scaled to unit length, as float32 values (what every store keeps)."""
    return [float(x) for x in np.frombuffer(to_blob(vector), dtype="<f4")]


def to_blob(vector: Sequence[float]) -> bytes:
    """A unit-length float32 blob of `vector`."""
    array = np.asarray(vector, dtype=np.float32)
    norm = float(np.linalg.norm(array))
    return (array / norm if norm else array).astype("<f4").tobytes()


def rank(query: Sequence[float], blobs: Sequence[bytes], k: int) -> list[tuple[int, float]]:
    """Indexes into `blobs` of the `k` nearest by cosine similarity, best first, with scores."""
    q = np.frombuffer(to_blob(query), dtype="<f4")
    usable = [i for i, blob in enumerate(blobs) if len(blob) == q.nbytes]
    if not usable:
        return []
    matrix = np.stack([np.frombuffer(blobs[i], dtype="<f4") for i in usable])
    scores = matrix @ q
    order = np.argsort(-scores, kind="stable")[:k]
    return [(usable[int(j)], round(float(scores[j]), 6)) for j in order]


class Database:
    """One SQLite file, shared by the event loop's threads under a lock."""

    def __init__(self, path: Path, schema: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._conn.row_factory = sqlite3.Row
        self._lock = threading.Lock()
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.executescript(schema)

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """The connection, inside BEGIN/COMMIT (ROLLBACK on error)."""
        with self._lock:
            self._conn.execute("BEGIN")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return list(self._conn.execute(sql, params))

    def close(self) -> None:
        with self._lock:
            self._conn.close()
