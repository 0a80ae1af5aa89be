"""``endpoints = [...]`` in the catalog: any ``/v1/*`` path routed by model to a service that
declares it, through a real coordinator to small real HTTP services on real ports."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import openai
import pytest

pytestmark = pytest.mark.slow

ENDPOINTS = """
[services.rerank]
tier = 3
kind = "openai"
models = ["bge-reranker"]
endpoints = ["/v1/rerank"]
replicas = 4

[services.whisper]
tier = 3
kind = "http"
models = ["whisper-1"]
endpoints = ["/v1/audio/transcriptions", "/v1/responses/*"]
replicas = 4

[services.moderation]
tier = 3
kind = "openai"
models = ["omni-moderation"]
endpoints = ["/v1/moderations"]
labels = { nobody = "has this" }
"""


class _Echo(BaseHTTPRequestHandler):
    """Answers every POST with what it received (path, content type, size) and its name."""

    server: Any

    def do_GET(self) -> None:
        self._answer({"status": "ok"})

    def do_POST(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length)
        self._answer(
            {
                "text": "heard",
                "served_by": self.server.name,
                "path": self.path,
                "content_type": self.headers.get("content-type"),
                "length": len(body),
            }
        )

    def _answer(self, data: dict[str, Any]) -> None:
        raw = json.dumps(data).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def echo_services() -> Iterator[Callable[[str], str]]:
    """``echo_services("rerank-a")``: a real HTTP service on a free loopback port, its URL."""
    servers: list[tuple[ThreadingHTTPServer, threading.Thread]] = []

    def start(name: str) -> str:
        server = ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
        server.daemon_threads = True
        server.name = name  # type: ignore[attr-defined]
        thread = threading.Thread(target=server.serve_forever, name=f"echo-{name}")
        thread.start()
        servers.append((server, thread))
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server, thread in servers:
        server.shutdown()
        server.server_close()
        thread.join(10)


@pytest.fixture
def pool(
    pool_factory: Callable[..., Any],
    echo_services: Callable[[str], str],
    test_services_catalog: str,
) -> Any:
    """A coordinator with the gateway tests' catalog plus ``ENDPOINTS``, a worker for each."""
    pool = pool_factory(catalog_text=test_services_catalog + ENDPOINTS)
    pool.add_worker("w-rerank", {"rerank": echo_services("rerank")})
    pool.add_worker("w-whisper", {"whisper": echo_services("whisper")})
    return pool


def test_declared_endpoints_are_routed_by_model(pool: Any) -> None:
    with pool.client() as c:
        r = c.post("/v1/rerank", json={"model": "bge-reranker", "query": "q", "documents": ["a"]})
        assert r.status_code == 200, r.text
        assert r.json()["served_by"] == "rerank"
        assert r.json()["path"] == "/v1/rerank"
        assert r.headers["x-rma-worker"] == "w-rerank"

        # multipart: the model is a form field; the file goes to the worker untouched
        audio = b"RIFF" + bytes(range(256)) * 64
        r = c.post(
            "/v1/audio/transcriptions",
            data={"model": "whisper-1", "language": "en"},
            files={"file": ("hello.wav", audio, "audio/wav")},
        )
        assert r.status_code == 200, r.text
        assert r.json()["served_by"] == "whisper"
        assert r.json()["content_type"].startswith("multipart/form-data; boundary=")
        assert r.json()["length"] > len(audio)

        # urlencoded, and a "/*" endpoint: every path below it, with its query string
        r = c.post("/v1/responses/resp_1/cancel?x=1", data={"model": "whisper-1"})
        assert r.status_code == 200, r.text
        assert r.json()["path"] == "/v1/responses/resp_1/cancel?x=1"
        assert c.post("/v1/responses", json={"model": "whisper-1"}).json()["served_by"] == (
            "whisper"
        )

    # the official SDK's own transcription call goes through too
    client = openai.OpenAI(base_url=pool.url + "/v1", api_key=pool.api_key, max_retries=0)
    try:
        heard = client.audio.transcriptions.create(model="whisper-1", file=("a.wav", b"RIFF...."))
        assert heard.text == "heard"
        models = {m.id for m in client.models.list().data}
        assert {"bge-reranker", "whisper-1"} <= models  # kind "http" with endpoints: listed
        assert "omni-moderation" not in models  # nobody runs it
    finally:
        client.close()


def _error(r: httpx.Response, status: int, code: str) -> str:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["error"]["code"] == code, body
    return str(body["error"]["message"])


def test_what_no_service_serves_is_a_clear_error(pool: Any) -> None:
    with pool.client() as c:
        # an endpoint no catalog entry declares, with a model that exists elsewhere
        msg = _error(
            c.post("/v1/images/generations", json={"model": "fake-model", "prompt": "a cat"}),
            404,
            "endpoint_not_found",
        )
        assert "/v1/images/generations" in msg
        assert "fake" in msg  # the service that serves the model
        # ... and without a model
        msg = _error(c.post("/v1/images/generations", content=b"not even json"), 404,
                     "endpoint_not_found")  # fmt: skip
        assert "POST /v1/images/generations" in msg
        # a declared endpoint, a model whose service does not declare it
        msg = _error(c.post("/v1/rerank", json={"model": "fake-model"}), 404, "endpoint_not_found")
        assert "/v1/rerank" in msg
        assert "fake" in msg
        assert "rerank (models: bge-reranker)" in msg
        # a declared endpoint, a model nobody serves
        msg = _error(c.post("/v1/rerank", json={"model": "nope"}), 404, "model_not_found")
        assert "'nope'" in msg
        assert "rerank (models: bge-reranker)" in msg
        # a declared endpoint without a model, or with a body that is not JSON
        msg = _error(c.post("/v1/rerank", json={"query": "q"}), 400, "no_model")
        assert "'model'" in msg
        _error(c.post("/v1/rerank", content=b"{oops"), 400, "invalid_json")
        # declared, but no worker runs it: 503 naming the service
        msg = _error(c.post("/v1/moderations", json={"model": "omni-moderation"}), 503,
                     "no_worker")  # fmt: skip
        assert "'moderation'" in msg
        # other methods
        r = c.get("/v1/rerank")
        _error(r, 405, "method_not_allowed")
        assert "POST" in r.headers["allow"]
        _error(c.get("/v1/no-such-thing"), 404, "endpoint_not_found")
        r = c.get("/v1/chat/completions")
        _error(r, 405, "method_not_allowed")
        assert "POST" in r.headers["allow"]
        r = c.post("/v1/models")
        _error(r, 405, "method_not_allowed")
        assert "GET" in r.headers["allow"]

    with httpx.Client(base_url=pool.url, timeout=10) as anonymous:
        _error(anonymous.post("/v1/rerank", json={"model": "bge-reranker"}), 401,
               "missing_api_key")  # fmt: skip
        metrics = anonymous.get("/metrics").text
    assert 'rma_gateway_errors_total{service="-",code="endpoint_not_found"}' in metrics
    assert 'rma_gateway_errors_total{service="-",code="model_not_found"}' in metrics


def test_openapi_lists_the_declared_endpoints(pool: Any) -> None:
    schema = httpx.get(pool.url + "/openapi.json", timeout=10).json()
    rerank = schema["paths"]["/v1/rerank"]["post"]
    model = rerank["requestBody"]["content"]["application/json"]["schema"]["properties"]["model"]
    assert model["enum"] == ["bge-reranker"]
    assert (
        "multipart/form-data"
        in schema["paths"]["/v1/audio/transcriptions"]["post"]["requestBody"]["content"]
    )
    assert "post" in schema["paths"]["/v1/responses"]
    assert "post" in schema["paths"]["/v1/responses/{path}"]
    # declared but run by nobody: documented, with plain names
    moderation = schema["paths"]["/v1/moderations"]["post"]["requestBody"]["content"]
    assert "enum" not in moderation["application/json"]["schema"]["properties"]["model"]
    ids = [op["operationId"] for item in schema["paths"].values() for op in item.values()]
    assert len(ids) == len(set(ids))
    # OPTIONS names the documented method
    r = httpx.options(pool.url + "/v1/rerank", timeout=10)
    assert r.status_code == 204
    assert "POST" in r.headers["allow"]
