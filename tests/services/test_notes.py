"""`notes`: CRUD and search by meaning; embeddings come through the gateway."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

pytest.importorskip(
    "numpy", reason="numpy missing: needs the `local` extra: pip install 'rma-pool[local]'"
)

from rma.services import build_app  # noqa: E402


@pytest.fixture
def notes(make_settings, server, test_gateway, fake_openai) -> Iterator[httpx.Client]:  # type: ignore[no-untyped-def]
    """The notes service behind a test gateway with a model-free embedder."""
    with server(fake_openai(), health=None) as fake:
        gateway = test_gateway({"chat": fake, "embeddings": fake}, {})
        with server(gateway, health=None) as gw:
            app = build_app("notes", make_settings(gateway_url=gw))
            with server(app) as url, httpx.Client(base_url=url, timeout=30) as client:
                yield client


def test_note_crud(notes: httpx.Client) -> None:
    created = notes.post("/notes", json={"text": "buy oat milk", "title": "shop", "tags": ["home"]})
    assert created.status_code == 201
    note = created.json()
    assert note["text"] == "buy oat milk"
    assert note["tags"] == ["home"]
    assert notes.get(f"/notes/{note['id']}").json() == note
    replaced = notes.put(f"/notes/{note['id']}", json={"text": "buy soy milk"}).json()
    assert replaced["text"] == "buy soy milk"
    assert replaced["created_at"] == note["created_at"]
    assert [n["id"] for n in notes.get("/notes").json()["notes"]] == [note["id"]]
    assert notes.delete(f"/notes/{note['id']}").status_code == 204
    missing = notes.get(f"/notes/{note['id']}")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "not_found"


def test_search_filters_by_tag_and_ranks(notes: httpx.Client) -> None:
    notes.post("/notes", json={"text": "garden tomatoes need water", "tags": ["garden"]})
    notes.post("/notes", json={"text": "tax forms due in april", "tags": ["admin"]})
    results = notes.post("/search", json={"query": "water the tomatoes"}).json()["results"]
    assert results[0]["note"]["text"] == "garden tomatoes need water"
    assert results[0]["score"] > results[1]["score"]
    only = notes.post("/search", json={"query": "tomatoes", "tag": "admin"}).json()["results"]
    assert [r["note"]["tags"] for r in only] == [["admin"]]


@pytest.mark.parametrize(
    "body", [{}, {"text": ""}, {"text": "x", "tags": [""]}, {"text": "x", "tags": "a"}]
)
def test_bad_notes_are_422(notes: httpx.Client, body: dict[str, object]) -> None:
    response = notes.post("/notes", json=body)
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "invalid_request"


def test_gateway_down_is_503_not_500(make_settings, server) -> None:  # type: ignore[no-untyped-def]
    app = build_app("notes", make_settings(gateway_url="http://127.0.0.1:9", gateway_timeout=2))
    with server(app) as url:
        response = httpx.post(f"{url}/notes", json={"text": "hello"})
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "gateway_unreachable"


@pytest.mark.model
def test_notes_found_by_meaning_with_real_embeddings(  # type: ignore[no-untyped-def]
    make_settings, server, test_gateway, embeddings_url
) -> None:
    gateway = test_gateway({"embeddings": embeddings_url, "chat": embeddings_url}, {})
    with (
        server(gateway, health=None) as gw,
        server(build_app("notes", make_settings(gateway_url=gw))) as url,
        httpx.Client(base_url=url, timeout=60) as client,
    ):
        for text in [
            "Call the plumber about the leaking kitchen sink",
            "Quarterly revenue grew twelve percent",
            "Remember to feed the cat before leaving",
        ]:
            assert client.post("/notes", json={"text": text}).status_code == 201
        found = client.post("/search", json={"query": "water dripping under the faucet"})
        best = found.json()["results"][0]["note"]["text"]
        pet = client.post("/search", json={"query": "my kitten is hungry", "top_k": 1})
    assert best == "Call the plumber about the leaking kitchen sink"
    assert pet.json()["results"][0]["note"]["text"] == "Remember to feed the cat before leaving"
