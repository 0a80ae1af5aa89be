"""Comparators, the catalog's ``verify`` field and the adaptive verification rate (no I/O)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rma.catalog import load_catalog
from rma.catalog.loader import CatalogError
from rma.coordinator.registry import WorkerState
from rma.coordinator.trust import reputation
from rma.coordinator.trust.compare import comparator_for
from rma.schemas.api import Capabilities, parse_verify
from rma.schemas.enums import Transport, WorkerStatus
from rma.settings import CoordinatorSettings


def _emb(*vectors: list[float]) -> bytes:
    data = [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)]
    return json.dumps({"object": "list", "data": data, "model": "m"}).encode()


def test_cosine_agrees_on_near_vectors_and_not_on_others() -> None:
    cmp = comparator_for("cosine:0.99")
    assert cmp(_emb([1.0, 2.0, 3.0]), _emb([1.001, 2.0, 3.0])).agree
    assert not cmp(_emb([1.0, 2.0, 3.0]), _emb([3.0, -2.0, 1.0])).agree
    assert not cmp(_emb([1.0, 2.0]), _emb([1.0, 2.0], [1.0, 2.0])).agree  # count differs
    assert not cmp(_emb([1.0, 2.0]), _emb([1.0, 2.0, 3.0])).agree  # dimension differs
    assert not cmp(_emb([1.0]), b"not json").agree
    # the order of "data" is by index, not by position
    a = json.dumps({"data": [{"index": 1, "embedding": [0, 1]}, {"index": 0, "embedding": [1, 0]}]})
    assert cmp(a.encode(), _emb([1.0, 0.0], [0.0, 1.0])).agree


def test_json_ignores_ids_and_times_but_not_labels() -> None:
    cmp = comparator_for("json")
    ents = [{"text": "Acme", "label": "ORG", "start": 0, "end": 4}]
    a = json.dumps({"id": "1", "created": 5, "entities": ents}).encode()
    b = json.dumps({"entities": ents, "id": "2", "created": 6}).encode()
    assert cmp(a, b).agree
    wrong = json.dumps({"entities": [{**ents[0], "label": "MISC"}]}).encode()
    assert not cmp(a, wrong).agree


def test_text_and_exact() -> None:
    text = comparator_for("text:0.9")
    assert text(b'{"text": "the quick brown fox"}', b'{"text": "the quick brown f0x"}').agree
    assert not text(b'{"text": "the quick brown fox"}', b'{"text": "lorem ipsum"}').agree
    exact = comparator_for("exact")
    assert exact(b"abc", b"abc").agree
    assert not exact(b"abc", b"abd").agree


@pytest.mark.parametrize(
    ("value", "parsed"),
    [("cosine", ("cosine", 0.99)), ("cosine:0.95", ("cosine", 0.95)), ("JSON", ("json", None)),
     ("text", ("text", 0.9)), ("exact", ("exact", None))],
)  # fmt: skip
def test_parse_verify(value: str, parsed: tuple[str, float | None]) -> None:
    assert parse_verify(value) == parsed


@pytest.mark.parametrize("bad", ["md5", "cosine:2", "cosine:x", "json:0.5", ""])
def test_a_bad_verify_in_the_catalog_is_refused_with_a_clear_error(
    tmp_path: Path, bad: str
) -> None:
    path = tmp_path / "catalog.toml"
    path.write_text(f'[services.embeddings]\nverify = "{bad}"\n')
    with pytest.raises(CatalogError, match="verify"):
        load_catalog(path)


def test_the_built_in_catalog_declares_comparators() -> None:
    cat = load_catalog()
    assert cat["embeddings"].verify == "cosine:0.99"
    assert cat["ner"].verify == "json"
    assert cat["ocr"].verify == "text:0.9"
    assert cat["llm"].verify is None


def _worker() -> WorkerState:
    caps = Capabilities(cpu_cores=2, memory_mb=4096)
    return WorkerState("w", "w", WorkerStatus.ONLINE, 2, Transport.DIRECT, caps, {}, ["emb"])


def test_the_rate_is_high_for_a_new_worker_decays_and_resets_on_a_disagreement() -> None:
    s = CoordinatorSettings(
        verify_rate_new=1.0, verify_new_results=10, verify_decay=0.5, verify_rate_floor=0.05
    )
    w = _worker()
    assert w.reputation == 0.5
    rates = []
    for _ in range(20):
        rates.append(reputation.chance(w, s))
        reputation.agreed(w)
    assert rates[:10] == [1.0] * 10
    assert rates[10] == 0.5
    assert rates[11] == 0.25
    assert rates[-1] == 0.05  # the floor
    assert w.reputation > 0.9
    reputation.disagreed(w)
    assert reputation.chance(w, s) == 1.0
    assert (w.verified, w.disagreements) == (21, 1)


def test_quarantine_needs_evidence_and_a_low_reputation() -> None:
    s = CoordinatorSettings(quarantine_threshold=0.3, quarantine_min_verified=3)
    w = _worker()
    reputation.disagreed(w)
    reputation.disagreed(w)
    assert w.reputation < 0.3
    assert not reputation.should_quarantine(w, s)  # 2 < 3 verified results
    reputation.disagreed(w)
    assert reputation.should_quarantine(w, s)
    w.trusted = True
    assert not reputation.should_quarantine(w, s)
    w.trusted = False
    assert not reputation.should_quarantine(w, s.model_copy(update={"quarantine_threshold": 0}))
