"""The gateway's client API through a real coordinator process and real fake-backend processes.

Clients are the official ``openai`` SDK (``max_retries=0``: a failure must show, not be retried
away by the client) and plain httpx for the error shapes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import httpx
import openai
import pytest

pytestmark = pytest.mark.slow

CHAT = [{"role": "user", "content": "hello there"}]


def sdk(pool, key: str | None = None) -> openai.OpenAI:
    return openai.OpenAI(base_url=pool.url + "/v1", api_key=key or pool.api_key, max_retries=0)


def test_openai_sdk_chat_stream_embeddings_completions(pool, backends) -> None:
    a, b = backends("a"), backends("b")
    pool.add_worker("wa", {"fake": a.url})
    pool.add_worker("wb", {"fake": b.url})
    client = sdk(pool)

    assert {m.id for m in client.models.list().data} == {"fake-model", "fake-embed"}
    assert client.models.retrieve("fake-model").id == "fake-model"

    chat = client.chat.completions.create(model="fake-model", messages=CHAT)
    assert chat.choices[0].message.content == f"echo(11) from {chat.system_fingerprint}"
    assert chat.system_fingerprint in ("a", "b")
    assert chat.usage is not None
    assert chat.usage.completion_tokens == 3

    chunks = list(client.chat.completions.create(model="fake-model", messages=CHAT, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    served_by = chunks[0].system_fingerprint
    assert text.split() == ["echo(11)", "from", served_by] * 2 + ["echo(11)", "from"]
    assert chunks[-1].usage is not None  # the final usage chunk came through too

    emb = client.embeddings.create(model="fake-embed", input=["one", "two", "three"])
    assert [d.index for d in emb.data] == [0, 1, 2]
    assert len(emb.data[0].embedding) == 384

    legacy = client.completions.create(model="fake-model", prompt="abc")
    assert legacy.choices[0].text.startswith("echo(3) from ")


def test_errors_are_openai_shaped(pool, backends) -> None:
    client = sdk(pool)
    # No worker runs the service yet: 503 naming it.
    with pytest.raises(openai.InternalServerError) as exc:
        client.chat.completions.create(model="fake-model", messages=CHAT)
    assert exc.value.status_code == 503
    assert "'fake'" in exc.value.message
    assert client.models.list().data == []  # no healthy service: no models

    a = backends("a")
    pool.add_worker("wa", {"fake": a.url})
    with pytest.raises(openai.NotFoundError) as nf:
        client.chat.completions.create(model="no-such-model", messages=CHAT)
    assert "no-such-model" in nf.value.message

    with pool.client() as c:
        r = c.post("/v1/chat/completions", content=b"{not json")
        assert r.status_code == 400
        assert r.json()["error"]["code"] == "invalid_json"
        r = c.post("/v1/chat/completions", json={"messages": CHAT})
        assert r.status_code == 400
        assert "model" in r.json()["error"]["message"]
        r = c.get("/v1/chat/completions")
        assert r.status_code == 405
        assert "error" in r.json()
        r = c.get("/v1/models/nope")
        assert r.status_code == 404
        assert r.json()["error"]["code"] == "model_not_found"


def test_auth_keeps_roles_apart(pool, backends) -> None:
    a = backends("a")
    pool.add_worker("wa", {"fake": a.url})
    _, credential = pool.workers["wa"]
    body = {"model": "fake-model", "messages": CHAT}
    url = pool.url + "/v1/chat/completions"

    r = httpx.post(url, json=body)
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "missing_api_key"
    r = httpx.post(url, json=body, headers={"authorization": "Bearer rma_key_bogus_bogus"})
    assert r.status_code == 401
    assert r.json()["error"]["message"] == "invalid API key"
    r = httpx.post(url, json=body, headers={"authorization": f"Bearer {pool.coord.admin_key}"})
    assert r.status_code == 403
    assert "admin key" in r.json()["error"]["message"]
    r = httpx.post(url, json=body, headers={"authorization": f"Bearer {credential}"})
    assert r.status_code == 403
    assert "worker credential" in r.json()["error"]["message"]
    r = httpx.get(pool.url + "/v1/models")
    assert r.status_code == 401

    with pytest.raises(openai.AuthenticationError):
        sdk(pool, key="rma_key_wrong_wrong").models.list()
    # The client's key is not forwarded to the worker.
    with pool.client() as c:
        echoed = c.post("/api/services/fake/echo/x", content=b"hi").json()
    assert echoed["path"] == "/echo/x"


def test_anonymous_clients_only_when_started_so(pool_factory, backends) -> None:
    pool = pool_factory(env={"RMA_ANONYMOUS_CLIENTS": "true"})
    a = backends("a")
    pool.add_worker("wa", {"fake": a.url})
    r = httpx.post(
        pool.url + "/v1/chat/completions", json={"model": "fake-model", "messages": CHAT}
    )
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == "echo(11) from a"
    # Roles still apart: the admin key is no client key even here.
    admin = {"authorization": f"Bearer {pool.coord.admin_key}"}
    r = httpx.get(pool.url + "/v1/models", headers=admin)
    assert r.status_code == 403


def test_rate_limit_per_key(pool, backends) -> None:
    a = backends("a")
    pool.add_worker("wa", {"fake": a.url})
    key = pool.create_key(rpm=2)
    with pool.client(key) as c:
        body = {"model": "fake-model", "messages": CHAT}
        assert c.post("/v1/chat/completions", json=body).status_code == 200
        assert c.post("/v1/chat/completions", json=body).status_code == 200
        r = c.post("/v1/chat/completions", json=body)
    assert r.status_code == 429
    assert int(r.headers["retry-after"]) >= 1
    assert "2 requests per minute" in r.json()["error"]["message"]
    # Another key is not affected.
    with pool.client() as c:
        assert c.post("/v1/chat/completions", json=body).status_code == 200


def test_generic_service_route_streams_any_method(pool, backends) -> None:
    a = backends("a")
    with pool.client() as c:
        r = c.get("/api/services/echo/echo/x")
        assert r.status_code == 503
        assert "'echo'" in r.json()["error"]["message"]
        r = c.get("/api/services/nope/x")
        assert r.status_code == 404
        assert r.json()["error"]["code"] == "unknown_service"
    pool.add_worker("wa", {"echo": a.url})
    with pool.client() as c:
        r = c.put("/api/services/echo/echo/some/path?q=1&r=two", content=b"payload")
        assert r.status_code == 200
        assert r.json() == {
            "method": "PUT",
            "path": "/echo/some/path?q=1&r=two",
            "body": "payload",
            "backend": "a",
        }
        assert r.headers["x-rma-worker"] == "wa"
        big = b"x" * (3 << 20)
        r = c.post("/api/services/echo/echo", content=big)
        assert r.status_code == 200
        assert len(r.json()["body"]) == len(big)
        r = c.get("/api/services/echo/health")
        assert r.json()["name"] == "a"


def test_usage_stats_and_metrics(pool, backends) -> None:
    a = backends("a")
    pool.add_worker("wa", {"fake": a.url})
    client = sdk(pool)
    for _ in range(5):
        client.chat.completions.create(model="fake-model", messages=CHAT)
    list(client.chat.completions.create(model="fake-model", messages=CHAT, stream=True))
    with pool.coord.admin() as c:
        stats = c.get("/api/admin/stats").json()
        metrics = c.get("/metrics").text
    by_service = {u["service"]: u for u in stats["usage"]["by_service"]}
    fake = by_service["fake"]
    assert fake["requests"] == 6
    assert fake["errors"] == 0
    assert fake["tokens"] == 5 * (2 + 3) + (1 + 8)  # from each answer's usage object
    assert 0 < fake["p50_ms"] <= fake["p95_ms"]
    assert [u["worker"] for u in stats["usage"]["by_worker"]] == ["wa"]
    assert 'rma_gateway_requests_total{service="fake",status="200"} 6' in metrics
    assert 'rma_gateway_request_duration_seconds_count{service="fake"} 6' in metrics
    assert "rma_gateway_inflight" in metrics
    assert "rma_gateway_queue_depth 0" in metrics
    assert 'rma_workers{status="online"} 1' in metrics


def test_an_oversized_chunked_body_is_a_413_in_the_metrics_too(pool_factory, backends) -> None:
    pool = pool_factory(env={"RMA_MAX_GATEWAY_BODY_BYTES": "1000"})
    pool.add_worker("wa", {"fake": backends("a").url})

    def chunks():  # no Content-Length: the limit must count the bytes as they come
        for _ in range(10):
            yield b"x" * 500

    with pool.client() as c:
        r = c.post("/api/services/fake/echo", content=chunks())
        assert r.status_code == 413
        assert r.json()["error"]["code"] == "too_large"
        metrics = c.get("/metrics").text
    lines = [ln for ln in metrics.splitlines() if ln.startswith("rma_gateway_requests_total{")]
    assert any('status="413"' in ln for ln in lines), lines
    assert not any('status="499"' in ln for ln in lines), lines


def test_trusted_only_requests_go_to_trusted_workers(pool, backends) -> None:
    """`x-rma-trusted: 1` (sensitive data): only workers the operator trusts ever see it."""
    plain = pool.add_worker("plain", {"fake": backends("p").url})
    trusted = pool.add_worker("vault", {"fake": backends("v").url})
    body = {"model": "fake-model", "messages": [{"role": "user", "content": "secret"}]}
    with pool.client() as c:
        r = c.post("/v1/chat/completions", json=body, headers={"x-rma-trusted": "1"})
        assert r.status_code == 503
        assert r.json()["error"]["code"] == "no_trusted_worker"
    env = {**os.environ, "RMA_COORDINATOR_URL": pool.url, "RMA_ADMIN_KEY": pool.coord.admin_key}
    proc = subprocess.run(
        [sys.executable, "-m", "rma", "admin", "trust", trusted, "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["trusted"] is True
    with pool.client() as c:
        served = {
            c.post("/v1/chat/completions", json=body, headers={"x-rma-trusted": "1"}).headers[
                "x-rma-worker"
            ]
            for _ in range(12)
        }
        anyone = {  # distinct conversations (one conversation sticks to one worker: affinity)
            c.post(
                "/v1/chat/completions",
                json={**body, "messages": [{"role": "user", "content": f"hi {i}"}]},
            ).headers["x-rma-worker"]
            for i in range(20)
        }
    assert served == {"vault"}
    assert anyone == {"vault", "plain"}
    with pool.coord.admin() as admin:
        assert admin.get(f"/api/admin/workers/{plain}").json()["trusted"] is False
        assert admin.post(f"/api/admin/workers/{trusted}/untrust").json()["trusted"] is False
