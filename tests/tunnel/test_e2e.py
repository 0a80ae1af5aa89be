"""Through the whole product: the ``openai`` SDK -> a real coordinator process (gateway) -> the
tunnel -> a worker process -> a fake OpenAI backend process (fast and deterministic under load).

The worker here is ``bench/tunnel_worker.py`` (register, heartbeat, the real
``TunnelClient``) so that it can be SIGKILLed on its own, taking its tunnel with it; the agent
proper (``rma worker join``) is exercised in ``test_netns.py``.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
HELPER = ROOT / "bench" / "tunnel_worker.py"  # the real TunnelClient as its own process


def _gateway_conftest() -> Any:
    """The gateway tests' helpers (fake backend processes, a coordinator with a test catalog)."""
    path = ROOT / "tests" / "gateway" / "conftest.py"
    spec = importlib.util.spec_from_file_location("_rma_gateway_conftest", path)
    assert spec
    assert spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


gw = _gateway_conftest()
backends = gw.backends  # fixtures: fake backend processes, a coordinator with a test catalog
pool_factory = gw.pool_factory

ENV = {"RMA_TUNNEL_PING_INTERVAL": "0.5", "RMA_TUNNEL_PING_TIMEOUT": "3"}


class TunnelWorker:
    def __init__(self, pool: Any, name: str, services: dict[str, str]) -> None:
        args = [sys.executable, str(HELPER), "--coordinator", pool.url, "--name", name]
        args += ["--heartbeat", "1"]
        args += ["--token", pool.coord.token()]
        for svc, url in services.items():
            args += ["--service", f"{svc}={url}"]
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            self.proc.stdout.close()
            raise RuntimeError(f"tunnel worker {name} exited with {self.proc.wait(5)}")
        self.id = json.loads(line)["worker_id"]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@pytest.fixture
def tunnel_workers() -> Iterator[Callable[..., TunnelWorker]]:
    made: list[TunnelWorker] = []

    def make(pool: Any, name: str, services: dict[str, str]) -> TunnelWorker:
        w = TunnelWorker(pool, name, services)
        made.append(w)
        return w

    yield make
    for w in made:
        w.kill()


def wait_routable(pool: Any, model: str = "fake-model", n: int = 1) -> None:
    """Until ``n`` distinct backends answered (heartbeats reported, tunnels up)."""
    seen: set[str] = set()
    deadline = time.monotonic() + 20
    tries = 0
    with pool.client() as c:
        while len(seen) < n:
            tries += 1  # a new conversation each time (one conversation sticks to one worker)
            r = c.post(
                "/v1/chat/completions",
                json={"model": model, "messages": [{"role": "user", "content": f"ping {tries}"}]},
            )
            if r.status_code == 200:
                seen.add(r.json()["system_fingerprint"])
            elif time.monotonic() > deadline:
                raise AssertionError(f"not routable: {r.status_code} {r.text}")
            else:
                time.sleep(0.1)


def test_openai_sdk_through_the_tunnel(
    pool_factory: Any, backends: Any, tunnel_workers: Any
) -> None:
    pool = pool_factory(env=ENV)
    backend = backends("behind-nat")
    worker = tunnel_workers(pool, "nat", {"fake": backend.url, "echo": backend.url})
    wait_routable(pool)
    with pool.coord.admin() as c:
        listed = c.get(f"/api/admin/workers/{worker.id}").json()
        assert listed["transport"] == "tunnel"
        assert c.get("/api/admin/stats").json()["tunnels"] == 1

    client = openai.OpenAI(base_url=pool.url + "/v1", api_key=pool.api_key, max_retries=0)
    messages: Any = [{"role": "user", "content": "hello through the tunnel"}]
    answer = client.chat.completions.create(model="fake-model", messages=messages)
    assert answer.system_fingerprint == "behind-nat"
    assert answer.choices[0].message.content

    chunks = list(
        client.chat.completions.create(model="fake-model", messages=messages, stream=True)
    )
    assert len(chunks) > 2
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    emb = client.embeddings.create(model="fake-embed", input=["a", "b"])
    assert len(emb.data) == 2

    with pool.client() as c:  # the generic service route too
        r = c.post("/api/services/echo/echo/x?y=1", content=b"payload")
        assert r.status_code == 200, r.text
        assert r.json()["backend"] == "behind-nat"
        assert "x-backend" not in r.headers  # a worker's own headers stay behind (allow-list)


def test_tunnel_killed_in_the_middle_of_a_load(
    pool_factory: Any, backends: Any, tunnel_workers: Any
) -> None:
    """Requests waiting on the killed worker's headers are retried on the other: none lost.

    Streams that had started on it end with an error (never hang); the dead worker leaves
    routing at once but stays ``online`` until the liveness rules say otherwise.
    """
    pool = pool_factory(env=ENV)
    slow = backends("victim", "--delay", "3")
    fast = backends("survivor", "--delay", "0.05")
    victim = tunnel_workers(pool, "victim", {"fake": slow.url})
    tunnel_workers(pool, "survivor", {"fake": fast.url})
    wait_routable(pool, n=2)

    async def load() -> tuple[list[str], list[str]]:
        client = openai.AsyncOpenAI(
            base_url=pool.url + "/v1", api_key=pool.api_key, max_retries=0, timeout=30
        )
        messages: Any = [{"role": "user", "content": "under load"}]

        async def plain(i: int) -> str:
            r = await client.chat.completions.create(model="fake-model", messages=messages)
            return str(r.system_fingerprint)

        async def streamed(i: int) -> str:
            try:
                stream = await client.chat.completions.create(
                    model="fake-model", messages=messages, stream=True
                )
                async for _ in stream:
                    pass
                return "complete"
            except openai.APIError as exc:
                return f"error: {exc}"

        tasks = [asyncio.create_task(plain(i)) for i in range(48)]
        tasks += [asyncio.create_task(streamed(i)) for i in range(16)]
        # once the survivor has answered a few, the victim holds its share of the load, waiting
        # 3 s for its headers: kill it then
        pending = set(tasks[:48])
        served = 0
        while served < 5:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            served += len(done)
        victim.kill()
        results = await asyncio.wait_for(asyncio.gather(*tasks), 60)
        await client.close()
        return results[:48], results[48:]

    plain_results, stream_results = asyncio.run(load())
    assert all(r in ("victim", "survivor") for r in plain_results), plain_results
    assert "survivor" in plain_results
    assert all(r == "complete" or r.startswith("error") for r in stream_results)
    with pool.coord.admin() as c:
        status = c.get(f"/api/admin/workers/{victim.id}").json()["status"]
        assert status == "online"  # liveness is unchanged; routing already avoids it
        metrics = c.get("/metrics").text
    retries = sum(
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("rma_gateway_retries_total")
    )
    assert retries >= 1  # the kill did catch requests before their headers
    with pool.client() as c:
        for _ in range(10):
            r = c.post(
                "/v1/chat/completions",
                json={"model": "fake-model", "messages": [{"role": "user", "content": "after"}]},
            )
            assert r.status_code == 200, r.text
            assert r.json()["system_fingerprint"] == "survivor"
