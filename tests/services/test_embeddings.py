"""`embeddings`: OpenAI `/v1/embeddings` with the packaged all-MiniLM-L6-v2."""

from __future__ import annotations

import base64
import math
import struct

import httpx
import pytest

pytestmark = pytest.mark.model


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    return dot / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def embed(url: str, texts: list[str]) -> list[list[float]]:
    body = {"model": "all-minilm-l6-v2", "input": texts}
    response = httpx.post(f"{url}/v1/embeddings", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return [d["embedding"] for d in response.json()["data"]]


def test_related_sentences_are_closer_than_unrelated(embeddings_url: str) -> None:
    cat, kitten, stocks = embed(
        embeddings_url,
        [
            "A cat is sleeping on the sofa.",
            "A kitten naps on the couch.",
            "The stock market fell sharply on Monday.",
        ],
    )
    assert len(cat) == 384
    assert cosine(cat, kitten) > 0.6
    assert cosine(cat, kitten) > cosine(cat, stocks) + 0.3


def test_openai_shape_and_sdk(embeddings_url: str) -> None:
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{embeddings_url}/v1", api_key="unused")
    result = client.embeddings.create(model="all-minilm-l6-v2", input=["one", "two"])
    client.close()
    assert [d.index for d in result.data] == [0, 1]
    assert result.model == "all-minilm-l6-v2"
    assert result.usage.prompt_tokens > 0
    assert abs(sum(x * x for x in result.data[0].embedding) - 1.0) < 1e-3


def test_base64_matches_floats(embeddings_url: str) -> None:
    (floats,) = embed(embeddings_url, ["hello world"])
    body = {"input": "hello world", "encoding_format": "base64"}
    encoded = httpx.post(f"{embeddings_url}/v1/embeddings", json=body).json()["data"][0]
    decoded = struct.unpack("<384f", base64.b64decode(encoded["embedding"]))
    assert max(abs(a - b) for a, b in zip(decoded, floats)) < 1e-6


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"input": []}, 422),
        ({"input": [1, 2, 3]}, 422),
        ({"input": "x", "model": "text-embedding-3-small"}, 404),
        ({"input": "x", "dimensions": 128}, 422),
        ({"input": ["x"] * 300}, 413),
        ({}, 422),
    ],
)
def test_bad_requests_are_client_errors(embeddings_url: str, body: dict, status: int) -> None:
    response = httpx.post(f"{embeddings_url}/v1/embeddings", json=body)
    assert response.status_code == status
    assert set(response.json()["error"]) == {"code", "message"}
