"""The pool protected from workers and clients, through a real coordinator process.

- a worker serves only what the coordinator assigned it (a claim to another service gets no
  traffic, is shown to the operator and raises one ``claim_refused`` event);
- the client's secrets and address never reach a worker, and a worker's cookies never reach the
  client (header allow-lists both ways);
- any body a client can send is a 400, never a 500.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

CAPS = {"cpu_cores": 2, "memory_mb": 4096, "disk_free_mb": 10000, "os": "linux", "arch": "x86_64"}

pytestmark = pytest.mark.slow

CHAT = [{"role": "user", "content": "hello"}]


def register_claimer(pool: Any, name: str, endpoint: str) -> tuple[str, str]:
    """A worker that runs nothing (``runnable: []``) yet reports ``fake`` healthy."""
    body = {
        "token": pool.coord.token(),
        "name": name,
        "capabilities": CAPS,
        "transport": "direct",
        "runnable": [],
    }
    r = httpx.post(pool.url + "/api/worker/register", json=body, timeout=10)
    assert r.status_code == 201, r.text
    data = r.json()
    assert data["assignments"] == []
    pool.workers[name] = (data["worker_id"], data["credential"])
    return str(data["worker_id"]), str(data["credential"])


def test_an_unassigned_claim_gets_no_traffic_and_one_event(pool: Any, backends: Any) -> None:
    honest, thief = backends("honest"), backends("thief")
    pool.add_worker("honest", {"fake": honest.url})
    thief_id, _ = register_claimer(pool, "thief", thief.url)
    for _ in range(3):  # three heartbeats claiming the service: one event
        pool.heartbeat("thief", {"fake": thief.url})

    served: dict[str, int] = {}
    with pool.client() as c:
        for _ in range(20):
            r = c.post("/v1/chat/completions", json={"model": "fake-model", "messages": CHAT})
            assert r.status_code == 200, r.text
            who = r.json()["system_fingerprint"]
            served[who] = served.get(who, 0) + 1
    assert served == {"honest": 20}

    with pool.coord.admin() as admin:
        worker = admin.get(f"/api/admin/workers/{thief_id}").json()
        events = admin.get("/api/admin/events", params={"limit": 1000}).json()
        stats = admin.get("/api/admin/stats").json()
    assert worker["refused"] == ["fake"]
    assert worker["assignments"] == []
    (svc,) = worker["services"]
    assert svc["healthy"] is False
    assert "not assigned" in svc["message"]
    refused = [e for e in events if e["kind"] == "claim_refused"]
    assert len(refused) == 1
    assert refused[0]["worker_id"] == thief_id
    assert refused[0]["data"]["service"] == "fake"
    fake = next(s for s in stats["services"] if s["name"] == "fake")
    assert fake["healthy"] == 1  # the claim does not count as capacity


# --- headers ----------------------------------------------------------------------------------

SECRETS = {
    "cookie": "session=client-secret-cookie",
    "x-api-key": "client-secret-x-api-key",
    "proxy-authorization": "Basic c2VjcmV0",
    "forwarded": "for=10.9.8.7",
    "x-forwarded-for": "10.9.8.7",
    "x-forwarded-host": "internal.example",
    "x-forwarded-proto": "https",
    "x-real-ip": "10.9.8.7",
    "x-rma-trusted": "0",
    "x-custom-token": "client-secret-custom",
}
KEPT = {
    "accept": "application/json",
    "openai-organization": "org-kept",
    "x-request-id": "req-kept-1",
    "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
}


class _Capture(BaseHTTPRequestHandler):
    seen: list[dict[str, str]] = []

    def _answer(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        self.rfile.read(length)
        type(self).seen.append({k.lower(): v for k, v in self.headers.items()})
        body = json.dumps({"object": "list", "data": [], "model": "fake-embed"}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.send_header("set-cookie", "stolen=1; Path=/")
        self.send_header("location", "https://evil.example/")
        self.send_header("access-control-allow-origin", "*")
        self.send_header("x-worker-secret", "hidden")
        self.send_header("openai-processing-ms", "7")
        self.end_headers()
        self.wfile.write(body)

    do_POST = _answer
    do_GET = _answer

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def capture() -> Iterator[tuple[str, list[dict[str, str]]]]:
    _Capture.seen = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Capture)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", _Capture.seen
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_client_secrets_never_reach_a_worker_nor_its_cookies_the_client(
    pool: Any, capture: tuple[str, list[dict[str, str]]]
) -> None:
    url, seen = capture
    pool.add_worker("w", {"fake": url, "echo": url})
    with pool.client() as c:
        r1 = c.post(
            "/v1/embeddings",
            json={"model": "fake-embed", "input": "x"},
            headers={**SECRETS, **KEPT},
        )
        r2 = c.get("/api/services/echo/anything", headers={**SECRETS, **KEPT})
    for r in (r1, r2):
        assert r.status_code == 200, r.text
        assert "set-cookie" not in r.headers
        assert "location" not in r.headers
        assert "access-control-allow-origin" not in r.headers
        assert "x-worker-secret" not in r.headers
        assert r.headers["openai-processing-ms"] == "7"
        assert r.headers["x-rma-worker"] == "w"
    assert len(seen) == 2
    for headers in seen:
        assert "authorization" not in headers
        for name in SECRETS:
            assert name not in headers, name
        text = json.dumps(headers)
        assert pool.api_key not in text
        assert "client-secret" not in text
        assert "10.9.8.7" not in text and "127.0.0.1," not in text
        for name, value in KEPT.items():
            assert headers[name] == value


# --- bodies -----------------------------------------------------------------------------------

BAD_BODIES: list[tuple[str, bytes]] = [
    ("nested arrays", b"[" * 1000 + b"]" * 1000),
    ("deeply nested arrays", b"[" * 100_000),
    ("nested objects", b'{"a":' * 5000 + b"1" + b"}" * 5000),
    ("nested under model", b'{"model": "fake-model", "x": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"),
    ("huge integer", b'{"model": 1' + b"0" * 10_000 + b"}"),
    ("invalid utf-8", b'{"model": "\xff\xfe"}'),
    ("lone surrogate", b'{"model": "\\ud800"}'),
    ("integer past 4300 digits", b'{"model": "fake-model", "n": ' + b"9" * 5000 + b"}"),
    ("latin-1", '{"model": "caf\xe9"}'.encode("latin-1")),
    ("not an object", b'["fake-model"]'),
    ("a string", b'"fake-model"'),
    ("a number", b"42"),
    ("null", b"null"),
    ("empty", b""),
    ("whitespace", b"   \n"),
    ("model not a string", b'{"model": ["fake-model"]}'),
    ("model an object", b'{"model": {"a": 1}}'),
    ("truncated", b'{"model": "fake-model", "messages": ['),
    ("nul bytes", b'{"model": "fake\x00model"}'),
    ("NaN", b'{"model": NaN}'),
    ("binary", bytes(range(256))),
]
#: Valid JSON with a model: forwarded to the worker, which answers for itself.
FORWARDED: list[tuple[str, bytes]] = [
    ("huge float", b'{"model": "fake-model", "temperature": 1e999999}'),
    ("big integer value", b'{"model": "fake-model", "n": ' + b"9" * 4000 + b"}"),
]


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/embeddings", "/v1/completions"])
def test_any_body_is_a_400_never_a_500(pool: Any, backends: Any, path: str) -> None:
    pool.add_worker("w", {"fake": backends("a").url})
    with pool.client() as c:
        for what, body in BAD_BODIES:
            r = c.post(path, content=body, headers={"content-type": "application/json"})
            assert r.status_code in (400, 404), (what, r.status_code, r.text)
            error = r.json()["error"]
            assert error["code"] and error["message"], what
        for what, body in FORWARDED:
            r = c.post(path, content=body, headers={"content-type": "application/json"})
            assert r.status_code == 200, (what, r.status_code, r.text)
        # the gateway is still fine afterwards
        ok = c.post(path, json={"model": "fake-embed", "input": "x", "prompt": "x"})
        assert ok.status_code == 200, ok.text
