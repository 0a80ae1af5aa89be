"""Routing by model and labels: several services listing one model name (any healthy one serves
it, /v1/models lists it once); x-rma-prefer / x-rma-require."""

from __future__ import annotations

from typing import Any

TWO = """
[services.fake]
tier = 3
kind = "openai"
models = ["fake-model", "fake-embed"]
command = ["true"]
health = "/health"
replicas = 16

[services.fake2]
description = "a second service answering to the same model"
tier = 3
kind = "openai"
models = ["fake-model"]
command = ["true"]
health = "/health"
replicas = 16
"""


def test_two_services_listing_one_model_both_serve(pool_factory: Any, backends: Any) -> None:
    pool = pool_factory(catalog_text=TWO)
    body = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}
    # only the second service (by name) runs: the model is served, not a 503
    pool.add_worker("second", {"fake2": backends("b").url})
    with pool.client() as c:
        r = c.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        assert r.headers["x-rma-worker"] == "second"  # the worker's own headers stay behind
        models = [m["id"] for m in c.get("/v1/models").json()["data"]]
        assert models.count("fake-model") == 1
    # both run: both get traffic, and the model is still listed once
    pool.add_worker("first", {"fake": backends("a").url})
    with pool.client() as c:
        served = {
            c.post("/v1/chat/completions", json=body).headers["x-rma-worker"] for _ in range(30)
        }
        models = [m["id"] for m in c.get("/v1/models").json()["data"]]
    assert served == {"first", "second"}
    assert models.count("fake-model") == 1
    assert "fake-embed" in models


def test_label_headers_are_checked(pool: Any, backends: Any) -> None:
    pool.add_worker("plain", {"fake": backends("p").url})
    body = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}
    with pool.client() as c:
        r = c.post("/v1/chat/completions", json=body, headers={"x-rma-require": "region=eu"})
        assert r.status_code == 503
        assert r.json()["error"]["code"] == "no_matching_worker"
        r = c.post("/v1/chat/completions", json=body, headers={"x-rma-prefer": "region"})
        assert r.status_code == 400
        assert r.json()["error"]["code"] == "bad_header"
        r = c.post("/v1/chat/completions", json=body, headers={"x-rma-prefer": "region=eu"})
        assert r.status_code == 200  # nobody matches a preference: anyone serves


def test_a_conversation_stays_on_one_worker(pool: Any, backends: Any) -> None:
    for name in "abc":
        pool.add_worker(f"w{name}", {"fake": backends(name).url})
    with pool.client() as c:

        def turn(session: str) -> str:
            body = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}
            r = c.post("/v1/chat/completions", json=body, headers={"x-rma-session": session})
            assert r.status_code == 200, r.text
            return str(r.headers["x-rma-worker"])

        assert len({turn("conversation-1") for _ in range(12)}) == 1
        assert len({turn(f"conversation-{i}") for i in range(30)}) >= 2
