"""Chat verification: canary prompts and speed suspicion, with a real coordinator and fake
chat backends over real sockets (``bench/fake_backend.py``: honest ones answer the canary's sum,
``--lie`` answers a wrong one, ``--tokens N`` claims N completion tokens per answer)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import httpx
import openai
import pytest
from tests.gateway.conftest import FAKE_BACKEND, Backend, Pool

from rma.coordinator.trust.canary import Canary, answer_text, make_canary

CATALOG = f"""
[services.chat]
description = "fake chat, verified by canary prompts and speed suspicion"
tier = 3
kind = "openai"
models = ["fake-chat"]
task = "chat"
command = ["{{python}}", "{FAKE_BACKEND}", "--port", "{{port}}"]
health = "/health"
replicas = 16
verify = "canary"
"""


def _workers(pool: Pool) -> dict[str, dict[str, Any]]:
    with pool.coord.admin() as c:
        r = c.get("/api/admin/workers")
        r.raise_for_status()
        return {w["name"]: w for w in r.json()}


_sent = [0]


def _chat(pool: Pool) -> str:
    """One chat request (a new conversation each time: cache affinity would pin one)."""
    _sent[0] += 1
    client = openai.OpenAI(
        base_url=pool.url + "/v1", api_key=pool.api_key, max_retries=0, timeout=30
    )
    try:
        raw = client.chat.completions.with_raw_response.create(
            model="fake-chat", messages=[{"role": "user", "content": f"hello {_sent[0]}"}]
        )
    finally:
        client.close()
    assert raw.status_code == 200
    return raw.headers["x-rma-worker"]


def _until_quarantined(pool: Pool, name: str) -> None:
    deadline = time.monotonic() + 120
    while not _workers(pool)[name]["quarantined"]:
        assert time.monotonic() < deadline, f"{name} was never quarantined: {_workers(pool)}"
        _chat(pool)  # the client is always answered: the checks are off its path


def _quarantine_event(pool: Pool, worker_id: str) -> dict[str, Any]:
    with pool.coord.admin() as c:
        events = c.get("/api/admin/events").json()
    found = [e for e in events if e["kind"] == "quarantined" and e["worker_id"] == worker_id]
    assert found, events
    return dict(found[0])


def test_a_chat_worker_that_fails_canaries_is_quarantined(
    pool_factory: Callable[..., Pool], backends: Callable[..., Backend]
) -> None:
    pool = pool_factory(catalog_text=CATALOG)
    started = {}
    for name in ("honest1", "honest2", "honest3", "liar"):
        started[name] = backends(name, *(["--lie"] if name == "liar" else []))
        pool.add_worker(name, {"chat": started[name].url})
    _until_quarantined(pool, "liar")
    event = _quarantine_event(pool, pool.workers["liar"][0])
    assert event["data"]["check"] == "canary"
    assert event["data"]["service"] == "chat"
    assert "canary expected" in event["data"]["detail"]

    for _ in range(30):  # no client request reaches it any more
        assert _chat(pool) != "liar"
    ws = _workers(pool)
    for name in ("honest1", "honest2", "honest3"):
        assert ws[name]["disagreements"] == 0, ws[name]
        assert ws[name]["verified"] > 0, ws[name]  # they were asked canaries, and passed
        assert not ws[name]["quarantined"]
    assert ws["liar"]["status"] == "online"


def test_a_chat_worker_faster_than_its_hardware_is_quarantined(
    pool_factory: Callable[..., Pool], backends: Callable[..., Backend]
) -> None:
    # no canaries: only the speed counts; "fast" claims 5000 tokens per (instant) answer
    pool = pool_factory(env={"RMA_CANARY_RATE": "0"}, catalog_text=CATALOG)
    for name, args in (("honest", ()), ("fast", ("--tokens", "5000"))):
        pool.add_worker(name, {"chat": backends(name, *args).url})
    _until_quarantined(pool, "fast")
    event = _quarantine_event(pool, pool.workers["fast"][0])
    assert event["data"]["check"] == "speed"
    assert event["data"]["rate"] > 150  # the service tier's limit
    ws = _workers(pool)
    assert (ws["honest"]["disagreements"], ws["honest"]["quarantined"]) == (0, False)


def test_canary_prompts_and_their_check() -> None:
    import random

    c = make_canary(random.Random(1))
    a, b = (int(x) for x in c.prompt.removeprefix("What is ").split("?")[0].split(" + "))
    assert c.expected == str(a + b)
    chat = b'{"choices":[{"message":{"role":"assistant","content":"The answer is %s."}}]}'
    assert Canary("q", "42").check(chat % b"42").agree
    assert not Canary("q", "42").check(chat % b"420").agree  # a number, not a substring
    assert not Canary("q", "42").check(chat % b"41").agree
    assert not Canary("q", "42").check(b"not json").agree
    assert answer_text(b'{"choices":[{"text":"42"}]}') == "42"  # /v1/completions


@pytest.mark.parametrize("verify", ["canary:0.5"])
def test_canary_takes_no_threshold(verify: str) -> None:
    from rma.schemas.api import parse_verify

    with pytest.raises(ValueError, match="takes no threshold"):
        parse_verify(verify)
    assert parse_verify("canary") == ("canary", None)


def test_fake_backend_answers_canaries(backends: Callable[..., Backend]) -> None:
    honest, liar = backends("h"), backends("l", "--lie")
    body = {"model": "m", "messages": [{"role": "user", "content": "What is 17 + 25? Answer."}]}
    for b, want in ((honest, "42"), (liar, "49")):
        r = httpx.post(b.url + "/v1/chat/completions", json=body, timeout=10)
        assert r.json()["choices"][0]["message"]["content"] == want
