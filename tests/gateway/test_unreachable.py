"""A worker that cannot be reached (connection refused, tunnel gone) leaves routing at once.

It comes back on its next heartbeat, not after the offline window; real coordinator, real
backend processes (SIGKILLed: their port refuses connections), real agents for the tunnel.
"""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
from test_agents import kill_machine

CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}
_asked = itertools.count()


def _chat() -> dict[str, object]:
    """A new conversation each time (the same one would stick to one worker: cache affinity)."""
    return {**CHAT, "messages": [{"role": "user", "content": f"hi {next(_asked)}"}]}


def _retries(pool) -> float:
    text = httpx.get(pool.url + "/metrics", timeout=10).text
    for line in text.splitlines():
        if line.startswith("rma_gateway_retries_total"):
            return float(line.split()[-1])
    return 0.0


def _models(pool) -> list[str]:
    with pool.client() as c:
        return [m["id"] for m in c.get("/v1/models").json()["data"]]


def test_refused_worker_leaves_routing_until_its_next_heartbeat(pool_factory, backends) -> None:
    # A short cool-down: without the fast exit, the dead worker is tried again after 0.2 s.
    pool = pool_factory(env={"RMA_COOLDOWN_BASE": "0.2", "RMA_COOLDOWN_MAX": "0.2"})
    pool.add_worker("wa", {"fake": backends("a").url})
    b = backends("b")
    pool.add_worker("wb", {"fake": b.url})
    b.kill(signal.SIGKILL)  # its port now refuses connections
    with pool.client() as c:
        deadline = time.monotonic() + 30
        while _retries(pool) < 1:  # until the dead worker was picked once (and refused)
            assert time.monotonic() < deadline, "the dead worker was never tried"
            r = c.post("/v1/chat/completions", json=_chat())
            assert r.status_code == 200, r.text
        seen = _retries(pool)
        until = time.monotonic() + 1.5  # well past the cool-down
        n = 0
        while time.monotonic() < until or n < 20:
            r = c.post("/v1/chat/completions", json=_chat())
            assert r.status_code == 200, r.text
            assert r.headers["x-rma-worker"] == "wa"
            n += 1
        assert _retries(pool) == seen  # the dead worker was not tried again
        b2 = backends("b")  # the worker's next heartbeat reports a working endpoint
        pool.heartbeat("wb", {"fake": b2.url})
        served = set()
        deadline = time.monotonic() + 30
        while "wb" not in served:
            assert time.monotonic() < deadline, served
            r = c.post("/v1/chat/completions", json=_chat())
            assert r.status_code == 200, r.text
            served.add(r.headers["x-rma-worker"])


def test_the_only_worker_refusing_is_out_at_once_with_a_503(pool, backends) -> None:
    a = backends("a")
    pool.add_worker("wa", {"fake": a.url})
    assert _models(pool) == ["fake-model", "fake-embed"]
    a.kill(signal.SIGKILL)
    with pool.client() as c:
        r = c.post("/v1/chat/completions", json=_chat())
        assert r.status_code == 502, r.text  # this one tried it
        assert "could not connect" in r.json()["error"]["message"]
        r = c.post("/v1/chat/completions", json=_chat())
        assert r.status_code == 503, r.text  # the next one knows at once
        assert r.json()["error"]["code"] == "no_worker"
        assert _models(pool) == []
        with pool.coord.admin() as admin:
            (w,) = admin.get("/api/admin/workers").json()
        assert w["status"] == "online"  # not judged offline: only out of routing
        pool.heartbeat("wa", {"fake": backends("a2").url})
        r = c.post("/v1/chat/completions", json=_chat())
        assert r.status_code == 200, r.text


def _tunnel_agent(pool, tmp_path: Path, name: str) -> subprocess.Popen[bytes]:
    args = ["--coordinator", pool.url, "--token", pool.coord.token(), "--name", name]
    args += ["--transport", "tunnel", "--runtime", "process", "--catalog", str(pool.catalog)]
    args += ["--data-dir", str(tmp_path / name)]
    with open(tmp_path / f"{name}.log", "ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "rma", "worker", "join", *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "RMA_HEARTBEAT_INTERVAL": "1"},
        )


def test_a_dropped_tunnel_leaves_routing_at_once(
    pool_factory, tmp_path, test_services_catalog
) -> None:
    pool = pool_factory(env={"RMA_OFFLINE_AFTER": "600"}, catalog_text=test_services_catalog)
    agent = _tunnel_agent(pool, tmp_path, "t1")
    try:
        deadline = time.monotonic() + 60
        while "fake-model" not in _models(pool):
            assert agent.poll() is None, (tmp_path / "t1.log").read_text()
            assert time.monotonic() < deadline, (tmp_path / "t1.log").read_text()
            time.sleep(0.2)
        kill_machine(agent)
        deadline = time.monotonic() + 20  # far less than the 600 s offline window
        while _models(pool):
            assert time.monotonic() < deadline, "the dead tunnel worker is still routed"
            time.sleep(0.1)
        with pool.client() as c:
            r = c.post("/v1/chat/completions", json=_chat())
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "no_worker"
        with pool.coord.admin() as admin:
            (w,) = admin.get("/api/admin/workers").json()
        assert w["status"] == "online"
    finally:
        kill_machine(agent)
