"""Answers that break mid-body: streams end cleanly, non-streamed answers are retried elsewhere.

Real coordinator process, real fake-backend processes that fail on cue (``[reset]`` sends part
of the answer then resets the connection; ``[stall]`` goes silent; ``@NAME`` picks the backend).
"""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest


def _log_text(pool) -> str:
    return pool.coord.log.read_text() if pool.coord.log else ""


def _events(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.startswith("event: ")]


def test_reset_stream_ends_with_one_error_event_and_the_connection_stays_usable(
    pool, backends
) -> None:
    pool.add_worker("wa", {"fake": backends("a").url})
    body = {
        "model": "fake-model",
        "stream": True,
        "messages": [{"role": "user", "content": "[reset]"}],
    }
    plain = {"model": "fake-model", "messages": [{"role": "user", "content": "hello"}]}
    seen: set[tuple[str, int]] = set()

    with pool.client() as c:
        for _ in range(3):  # the same keep-alive connection, again and again
            with c.stream("POST", "/v1/chat/completions", json=body) as r:
                assert r.status_code == 200
                text = "".join(r.iter_text())
                stream = r.extensions["network_stream"]
                seen.add(stream.get_extra_info("client_addr"))
            assert text.count("data: {") >= 1  # the first chunk came through
            assert _events(text) == ["event: error"], text  # exactly one error event
            error = json.loads(text.split("event: error\ndata: ", 1)[1].split("\n", 1)[0])
            assert error["error"]["code"] == "stream_broken"
            ok = c.post("/v1/chat/completions", json=plain)  # the next request on it works
            assert ok.status_code == 200, ok.text
            assert ok.json()["choices"][0]["message"]["content"] == "echo(5) from a"
    assert len(seen) == 1, seen  # one connection served all six requests
    log = _log_text(pool)
    assert "Traceback" not in log, log
    assert "after response already completed" not in log


def test_openai_sdk_sees_a_broken_stream_as_an_error(pool, backends) -> None:
    pool.add_worker("wa", {"fake": backends("a").url})
    client = openai.OpenAI(base_url=pool.url + "/v1", api_key=pool.api_key, max_retries=0)
    try:
        stream = client.chat.completions.create(
            model="fake-model", messages=[{"role": "user", "content": "[reset]"}], stream=True
        )
        with pytest.raises(openai.APIError) as exc:
            for _ in stream:
                pass
        assert "stream broke" in exc.value.message
        again = client.chat.completions.create(
            model="fake-model", messages=[{"role": "user", "content": "hi"}]
        )
        assert again.choices[0].message.content == "echo(2) from a"
    finally:
        client.close()


@pytest.mark.parametrize("how", ["reset", "stall"])
def test_non_streamed_answer_cut_mid_body_is_retried_on_another_worker(pool, backends, how) -> None:
    pool.add_worker("wa", {"fake": backends("a").url})
    pool.add_worker("wb", {"fake": backends("b").url})
    with pool.client() as c:
        # Whichever worker is picked first, the one named in the prompt fails mid-body (in ten
        # requests, the failing one is picked first at least once but for a 1 in 1024 chance).
        for i, target in enumerate("ababababab"):
            content = f"[{how}@{target}] please"
            body = {"model": "fake-model", "messages": [{"role": "user", "content": content}]}
            # a conversation of its own each time (cache affinity would keep one on one worker)
            r = c.post("/v1/chat/completions", json=body, headers={"x-rma-session": f"s{i}"})
            assert r.status_code == 200, r.text
            answer = r.json()["choices"][0]["message"]["content"]
            other = "b" if target == "a" else "a"
            assert answer == f"echo({len(content)}) from {other}"
            assert r.headers["x-rma-worker"] == f"w{other}"
        emb = {"model": "fake-embed", "input": f"[{how}@a]"}
        r = c.post("/v1/embeddings", json=emb)
        assert r.status_code == 200, r.text
        assert len(r.json()["data"][0]["embedding"]) == 384
    metrics = httpx.get(pool.url + "/metrics").text
    retries = [ln for ln in metrics.splitlines() if ln.startswith("rma_gateway_retries_total")]
    assert retries, metrics
    assert float(retries[0].split()[-1]) >= 1
    assert 'status="502"' not in metrics
    assert "Traceback" not in _log_text(pool)


def test_non_streamed_answer_above_the_hold_back_limit_streams_through(
    pool_factory, backends
) -> None:
    pool = pool_factory(env={"RMA_HOLD_BACK_BYTES": "64"})
    pool.add_worker("wa", {"fake": backends("a").url})
    pool.add_worker("wb", {"fake": backends("b").url})
    body = {"model": "fake-model", "messages": [{"role": "user", "content": "[reset] big"}]}
    with pool.client() as c:
        # Over the limit, the first half is already the client's: the answer is cut, not retried.
        with pytest.raises(httpx.HTTPError):
            c.post("/v1/chat/completions", json=body)
        ok = c.post(
            "/v1/chat/completions", json={**body, "messages": [{"role": "user", "content": "x"}]}
        )
        assert ok.status_code == 200
        assert ok.json()["choices"][0]["message"]["content"].startswith("echo(1) from ")


def test_the_only_worker_failing_mid_body_is_a_clean_502(pool, backends) -> None:
    pool.add_worker("wa", {"fake": backends("a").url})
    body = {"model": "fake-model", "messages": [{"role": "user", "content": "[reset]"}]}
    started = time.monotonic()
    with pool.client() as c:
        r = c.post("/v1/chat/completions", json=body)
        assert r.status_code == 502, r.text
        assert r.json()["error"]["code"] == "upstream_failed"
        assert "broke" in r.json()["error"]["message"]
        ok = c.post(
            "/v1/chat/completions", json={**body, "messages": [{"role": "user", "content": "x"}]}
        )
        assert ok.status_code == 200
    assert time.monotonic() - started < 30
