"""Comparators: do two workers' answers to the same request agree?

One per catalog ``verify`` kind (``ServiceSpec.verify``, parsed by ``parse_verify``):

- ``cosine:T``: OpenAI embeddings; every vector pair has cosine similarity >= T;
- ``json``: the two bodies are equal as JSON documents (NER entities);
- ``text:T``: text similarity (``difflib`` ratio) >= T, of the ``text`` field when the body is
  a JSON object that has one (OCR), else of the whole body;
- ``exact``: the same bytes.

Pure functions, no I/O: tested without a pool.
"""

from __future__ import annotations

import difflib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rma.schemas.api import parse_verify


@dataclass(frozen=True, slots=True)
class Comparison:
    """The verdict on two answers: ``score`` in 0..1 (1: identical) and why, for the evidence."""

    agree: bool
    score: float
    detail: str


Comparator = Callable[[bytes, bytes], Comparison]


def comparator_for(verify: str) -> Comparator:
    """The comparator for a catalog ``verify`` value; ``ValueError`` for an unknown one."""
    kind, threshold = parse_verify(verify)
    if kind == "cosine":
        t = 0.99 if threshold is None else threshold
        return lambda a, b: cosine(a, b, t)
    if kind == "text":
        t = 0.9 if threshold is None else threshold
        return lambda a, b: text(a, b, t)
    if kind == "json":
        return json_equal
    return exact


def exact(a: bytes, b: bytes) -> Comparison:
    same = a == b
    return Comparison(same, 1.0 if same else 0.0, "same bytes" if same else "different bytes")


def json_equal(a: bytes, b: bytes) -> Comparison:
    try:
        da, db = json.loads(a), json.loads(b)
    except (ValueError, RecursionError):
        return Comparison(False, 0.0, "an answer is not valid JSON")
    same = _strip(da) == _strip(db)
    return Comparison(same, 1.0 if same else 0.0, "equal JSON" if same else "different JSON")


def _strip(doc: Any) -> Any:
    """Fields that legitimately differ between workers (ids, times) are left out."""
    if isinstance(doc, dict):
        return {k: v for k, v in doc.items() if k not in ("id", "created", "system_fingerprint")}
    return doc


def cosine(a: bytes, b: bytes, threshold: float) -> Comparison:
    va, vb = _vectors(a), _vectors(b)
    if va is None or vb is None:
        return Comparison(False, 0.0, "an answer has no embeddings")
    if len(va) != len(vb):
        return Comparison(False, 0.0, f"{len(va)} embeddings against {len(vb)}")
    worst = 1.0
    for x, y in zip(va, vb, strict=True):
        if len(x) != len(y):
            return Comparison(False, 0.0, f"dimension {len(x)} against {len(y)}")
        worst = min(worst, _cos(x, y))
    ok = worst >= threshold
    return Comparison(
        ok, max(worst, 0.0), f"lowest cosine similarity {worst:.4f} (>= {threshold:g})"
    )


def _vectors(body: bytes) -> list[list[float]] | None:
    try:
        doc = json.loads(body)
        rows = sorted(doc["data"], key=lambda r: r.get("index", 0))
        out = [[float(v) for v in r["embedding"]] for r in rows]
    except (ValueError, RecursionError, KeyError, TypeError, AttributeError):
        return None
    return out if out else None


def _cos(x: list[float], y: list[float]) -> float:
    nx = math.sqrt(sum(v * v for v in x))
    ny = math.sqrt(sum(v * v for v in y))
    if nx == 0.0 or ny == 0.0:
        return 1.0 if nx == ny else 0.0
    return sum(p * q for p, q in zip(x, y, strict=True)) / (nx * ny)


def text(a: bytes, b: bytes, threshold: float) -> Comparison:
    ta, tb = _text_of(a), _text_of(b)
    ratio = difflib.SequenceMatcher(None, ta, tb, autojunk=False).ratio() if ta or tb else 1.0
    ok = ratio >= threshold
    return Comparison(ok, ratio, f"text similarity {ratio:.4f} (>= {threshold:g})")


def _text_of(body: bytes) -> str:
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        return body.decode("utf-8", "replace")
    if isinstance(doc, dict) and isinstance(doc.get("text"), str):
        return str(doc["text"])
    return body.decode("utf-8", "replace")
