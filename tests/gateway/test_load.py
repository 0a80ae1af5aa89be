"""Load, failover, stalls and saturation with real worker processes behind a real coordinator.

The workers here register over HTTP (as ``rma worker join --transport direct`` does) and point
at real fake-backend processes; ``test_agents.py`` runs the same failover through real agents.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter

import httpx
import openai
import pytest

pytestmark = pytest.mark.slow


def async_sdk(pool) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=pool.url + "/v1",
        api_key=pool.api_key,
        max_retries=0,  # the gateway must do the failing over, not the client
        timeout=30,
        http_client=openai.DefaultAsyncHttpxClient(
            limits=httpx.Limits(max_connections=64, max_keepalive_connections=64)
        ),
    )


async def run_load(pool, n: int, concurrency: int, on_progress=None) -> list[tuple[str, str]]:
    """``n`` chat requests, each with its own prompt; returns (expected length tag, answer)."""
    client = async_sdk(pool)
    sem = asyncio.Semaphore(concurrency)
    done = 0

    async def one(i: int) -> tuple[str, str]:
        nonlocal done
        prompt = "x" * (i % 50 + 1)
        async with sem:
            r = await client.chat.completions.create(
                model="fake-model", messages=[{"role": "user", "content": prompt}]
            )
        done += 1
        if on_progress:
            await on_progress(done)
        return f"echo({len(prompt)})", r.choices[0].message.content or ""

    try:
        return await asyncio.gather(*(one(i) for i in range(n)))
    finally:
        await client.close()


async def test_even_spread_under_concurrent_load(pool, backends) -> None:
    names = ["a", "b", "c"]
    for name in names:
        pool.add_worker(f"w{name}", {"fake": backends(name, "--delay", "0.02").url})
    results = await run_load(pool, n=300, concurrency=24)
    served = Counter(answer.split()[-1] for _, answer in results)
    assert set(served) == set(names)
    for name in names:  # least-loaded choice: each gets about a third
        assert 70 <= served[name] <= 130, served
    for tag, answer in results:
        assert answer.startswith(tag + " from ")


async def test_sigkill_a_worker_mid_load_every_request_still_answered(pool, backends) -> None:
    a = backends("a", "--delay", "0.05")
    b = backends("b", "--delay", "0.05")
    pool.add_worker("wa", {"fake": a.url})
    pool.add_worker("wb", {"fake": b.url})
    killed_at: list[int] = []

    async def kill_b(done: int) -> None:
        if done == 60 and not killed_at:
            b.kill(signal.SIGKILL)
            killed_at.append(done)

    results = await run_load(pool, n=240, concurrency=16, on_progress=kill_b)
    assert killed_at, "the worker was never killed"
    assert len(results) == 240
    for tag, answer in results:  # every request got a correct answer
        assert answer.startswith(tag + " from "), answer
    served = Counter(answer.split()[-1] for _, answer in results)
    assert served["b"] >= 20
    assert served["a"] > served["b"]
    async with httpx.AsyncClient() as c:
        metrics = (await c.get(pool.url + "/metrics")).text
    retries = [ln for ln in metrics.splitlines() if ln.startswith("rma_gateway_retries_total")]
    assert retries
    assert float(retries[0].split()[-1]) >= 1
    assert 'status="502"' not in metrics
    assert 'status="503"' not in metrics


def test_stalled_stream_ends_with_an_error_event_within_the_stall_timeout(pool, backends) -> None:
    pool.add_worker("wa", {"fake": backends("a").url})  # the pool's stall timeout is 2 s
    client = openai.OpenAI(base_url=pool.url + "/v1", api_key=pool.api_key, max_retries=0)
    stream = client.chat.completions.create(
        model="fake-model", messages=[{"role": "user", "content": "[stall]"}], stream=True
    )
    first = next(iter(stream))
    assert first.choices[0].delta.content  # bytes reached the client: no retry from here
    started = time.monotonic()
    with pytest.raises(openai.APIError) as exc:
        for _ in stream:
            pass
    waited = time.monotonic() - started
    assert 1.5 <= waited <= 5, waited
    assert "sent nothing for 2 s" in exc.value.message

    # The raw SSE: the final event is an `error` event, then the stream closes (no hang).
    stalled = [{"role": "user", "content": "[stall]"}]
    body = {"model": "fake-model", "stream": True, "messages": stalled}
    with pool.client() as c:
        r = c.post("/v1/chat/completions", json=body, timeout=10)
    assert r.status_code == 200
    assert r.text.rstrip().splitlines()[-2:][0] == "event: error"
    assert '"code": "stream_timeout"' in r.text


def test_no_answer_before_first_byte_timeout_is_504(pool_factory, backends) -> None:
    pool = pool_factory(env={"RMA_FIRST_BYTE_TIMEOUT": "1.5"})
    pool.add_worker("wa", {"fake": backends("a").url})
    started = time.monotonic()
    with pool.client() as c:
        r = c.post(
            "/v1/chat/completions",
            json={"model": "fake-model", "messages": [{"role": "user", "content": "[hang]"}]},
        )
    assert r.status_code == 504, r.text
    assert time.monotonic() - started < 5
    assert "did not answer in time" in r.json()["error"]["message"]


async def test_saturation_queues_then_429_with_retry_after(pool_factory, backends) -> None:
    pool = pool_factory(
        env={"RMA_WORKER_CAPACITY": "1", "RMA_QUEUE_SIZE": "1", "RMA_QUEUE_TIMEOUT": "10"}
    )
    pool.add_worker("wa", {"fake": backends("a").url})
    body = {"model": "fake-model", "messages": [{"role": "user", "content": "[slow:1.5]"}]}
    headers = {"authorization": f"Bearer {pool.api_key}"}
    async with httpx.AsyncClient(base_url=pool.url, headers=headers, timeout=30) as c:

        async def call(delay: float) -> httpx.Response:
            await asyncio.sleep(delay)
            return await c.post("/v1/chat/completions", json=body)

        first, queued, rejected = await asyncio.gather(call(0), call(0.3), call(0.6))
    assert first.status_code == 200
    assert queued.status_code == 200  # waited in the queue for the slot
    assert rejected.status_code == 429
    assert rejected.headers["retry-after"].isdigit()
    assert "at capacity" in rejected.json()["error"]["message"]


def test_a_client_that_goes_away_frees_the_worker(pool_factory, backends) -> None:
    """Non-streamed: the client hangs up while the worker thinks; its capacity comes back at once.

    With capacity 1, a second request gets served right after the first client left, long
    before the hanging worker request would have ended (first-byte timeout 30 s).
    """
    pool = pool_factory(env={"RMA_WORKER_CAPACITY": "1", "RMA_FIRST_BYTE_TIMEOUT": "30"})
    pool.add_worker("wa", {"fake": backends("a").url})
    hang = {"model": "fake-model", "messages": [{"role": "user", "content": "[hang]"}]}
    with pool.client() as c, pytest.raises(httpx.ReadTimeout):
        c.post("/v1/chat/completions", json=hang, timeout=1.0)
    started = time.monotonic()
    ok = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}
    with pool.client() as c:
        r = c.post("/v1/chat/completions", json=ok, timeout=20)
    assert r.status_code == 200, r.text
    assert time.monotonic() - started < 5
    with pool.client() as c:
        metrics = c.get("/metrics").text
    busy = [ln for ln in metrics.splitlines() if ln.startswith("rma_gateway_inflight{")]
    assert all(ln.endswith(" 0") for ln in busy), busy
