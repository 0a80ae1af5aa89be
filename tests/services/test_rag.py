"""`rag`: ingest, retrieve, answer with citations; embeddings and LLM through the gateway."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

pytest.importorskip(
    "numpy", reason="numpy missing: needs the `local` extra: pip install 'rma-pool[local]'"
)
pytest.importorskip(
    "multipart",
    reason="python-multipart missing: needs the `local` extra: pip install 'rma-pool[local]'",
)

from rma.services import build_app  # noqa: E402
from rma.services._vectors import rank, to_blob  # noqa: E402
from rma.services.rag import chunk_text  # noqa: E402

LISBON = (
    "Zorblax Robotics is a small company that builds garden robots. "
    "The headquarters of Zorblax Robotics is in Lisbon, Portugal. "
    "It was founded in 2019 by Marta Silva."
)
BREAD = "Sourdough bread needs a starter, flour, water and salt. Bake it at 240 degrees."


def test_chunks_respect_size_and_overlap() -> None:
    text = " ".join(f"Sentence number {i} is here." for i in range(60))
    chunks = chunk_text(text, size=200, overlap=40)
    assert all(len(c) <= 200 + 40 for c in chunks)
    assert chunks[0].startswith("Sentence number 0")
    assert "Sentence number 59 is here." in chunks[-1]
    assert len(chunks) > 5
    assert chunk_text("x" * 500, size=200, overlap=0) == ["x" * 200, "x" * 200, "x" * 100]
    assert chunk_text("   \n\n ", size=200, overlap=0) == []


def test_rank_orders_by_cosine() -> None:
    blobs = [to_blob([1, 0]), to_blob([0.7, 0.7]), to_blob([0, 1]), to_blob([1, 0, 0])]
    assert [i for i, _ in rank([0.1, 1.0], blobs, 2)] == [2, 1]


@pytest.fixture
def fake_rag(
    make_settings, server, test_gateway, fake_openai
) -> Iterator[tuple[httpx.Client, list[Any]]]:  # type: ignore[no-untyped-def]
    """The rag service with model-free embeddings and an echoing chat model."""
    seen: list[Any] = []
    settings = {"rag_chunk_chars": 120, "rag_chunk_overlap": 0}
    with (
        server(fake_openai(seen), health=None) as fake,
        server(test_gateway({"chat": fake, "embeddings": fake}, {}), health=None) as gw,
        server(build_app("rag", make_settings(gateway_url=gw, **settings))) as url,
        httpx.Client(base_url=url, timeout=30) as client,
    ):
        yield client, seen


def test_ingest_list_replace_delete(fake_rag) -> None:  # type: ignore[no-untyped-def]
    client, _ = fake_rag
    created = client.post("/documents", json={"id": "zb", "title": "Zorblax", "text": LISBON})
    assert created.status_code == 201
    assert created.json()["chunks"] == 2
    again = client.post("/documents", json={"id": "zb", "text": BREAD, "metadata": {"v": 2}})
    assert again.json()["chunks"] == 1
    assert [d["metadata"] for d in client.get("/documents").json()["documents"]] == [{"v": 2}]
    assert client.delete("/documents/zb").status_code == 204
    assert client.get("/documents/zb").status_code == 404
    assert client.delete("/documents/zb").json()["error"]["code"] == "not_found"


def test_query_sends_sources_to_the_llm_and_cites_them(fake_rag) -> None:  # type: ignore[no-untyped-def]
    client, seen = fake_rag
    client.post("/documents", json={"title": "Zorblax", "text": LISBON})
    client.post("/documents", json={"title": "Bread", "text": BREAD})
    result = client.post("/query", json={"question": "Where is Zorblax Robotics headquartered?"})
    assert result.status_code == 200
    body = result.json()
    assert body["citations"][0]["title"] == "Zorblax"
    assert body["citations"][0]["cited"] is True
    prompt = seen[-1]["messages"][-1]["content"]
    assert "[1] (Zorblax)" in prompt
    assert "Lisbon" in prompt
    assert seen[-1]["temperature"] == 0


def test_query_with_nothing_ingested_says_so(fake_rag) -> None:  # type: ignore[no-untyped-def]
    client, seen = fake_rag
    body = client.post("/query", json={"question": "anything?"}).json()
    assert body["citations"] == []
    assert "no documents" in body["answer"]
    assert seen == []


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/documents", {"text": ""}),
        ("/documents", {"text": "x", "id": "bad id/"}),
        ("/query", {"question": ""}),
        ("/query", {"question": "x", "top_k": 0}),
        ("/search", {}),
    ],
)
def test_bad_requests_are_422(fake_rag, path: str, body: dict) -> None:  # type: ignore[no-untyped-def]
    client, _ = fake_rag
    response = client.post(path, json=body)
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "invalid_request"


@pytest.mark.model
def test_answers_from_an_ingested_document_and_cites_it(  # type: ignore[no-untyped-def]
    make_settings, server, test_gateway, llm_url, embeddings_url
) -> None:
    gateway = test_gateway({"chat": llm_url, "embeddings": embeddings_url}, {})
    with (
        server(gateway, health=None) as gw,
        server(build_app("rag", make_settings(gateway_url=gw))) as url,
        httpx.Client(base_url=url, timeout=180) as client,
    ):
        client.post("/documents", json={"id": "zorblax", "title": "Zorblax", "text": LISBON})
        client.post("/documents", json={"id": "bread", "title": "Bread", "text": BREAD})
        response = client.post(
            "/query",
            json={"question": "In which city is the headquarters of Zorblax Robotics?"},
        )
    assert response.status_code == 200, response.text
    body = response.json()
    assert "Lisbon" in body["answer"]
    assert body["citations"][0]["document_id"] == "zorblax"
    assert body["citations"][0]["score"] > body["citations"][-1]["score"]


@pytest.mark.model
def test_upload_goes_through_the_pools_doc_service(  # type: ignore[no-untyped-def]
    make_settings, server, test_gateway, embeddings_url
) -> None:
    fpdf = pytest.importorskip("fpdf", reason="fpdf2 missing: needs the `dev` extra")
    pdf = fpdf.FPDF()
    pdf.set_font("Helvetica", size=12)
    pdf.add_page()
    pdf.multi_cell(0, 8, LISBON)
    services: dict[str, str] = {}
    gateway = test_gateway({"embeddings": embeddings_url}, services)
    with server(gateway, health=None) as gw:
        settings = make_settings(gateway_url=gw)
        with server(build_app("doc", settings)) as doc_url:
            services["doc"] = doc_url
            with server(build_app("rag", settings)) as url:
                files = {"file": ("zorblax.pdf", bytes(pdf.output()), "application/pdf")}
                created = httpx.post(f"{url}/documents/upload", files=files, timeout=60)
                hits = httpx.post(f"{url}/search", json={"query": "Lisbon office", "top_k": 1})
    assert created.status_code == 201, created.text
    assert created.json()["title"] == "zorblax.pdf"
    assert created.json()["metadata"] == {"filename": "zorblax.pdf", "format": "pdf"}
    assert "Lisbon" in hits.json()["results"][0]["text"]
