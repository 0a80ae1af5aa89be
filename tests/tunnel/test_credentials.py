"""A tunnel lives no longer than its worker's credential, unless the agent sends a renewed one.

Worker credentials here last 3 s (``credential_ttl``); a heartbeat renews one with less than
half of its life left, as in production (where they last 15 minutes).  Every part is real: the
coordinator app under uvicorn, a WebSocket on a loopback port, the agent's ``TunnelClient``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed
from websockets.typing import Subprotocol

from rma.agent.backoff import Backoff
from rma.agent.tunnel import TunnelClient, tunnel_url
from rma.tunnel.frames import SUBPROTOCOL, FrameType, encode

from .conftest import Backend, Coord, request, running_coord, wait_for

TTL = 3.0


@pytest.fixture
async def short_coord(tmp_path: Path, database_url: str) -> AsyncIterator[Coord]:
    # a long ping timeout: the raw WebSocket clients here never answer the hub's PINGs
    async with running_coord(
        tmp_path, database_url, credential_ttl=TTL, tunnel_ping_timeout=30
    ) as c:
        yield c


async def renew_forever(coord: Coord, credentials: list[str]) -> None:
    """The agent's heartbeat loop, reduced to what matters here: it renews the credential."""
    async with httpx.AsyncClient(base_url=coord.url, timeout=5) as http:
        while True:
            r = await http.post(
                "/api/worker/heartbeat",
                json={"services": []},
                headers={"authorization": f"Bearer {credentials[-1]}"},
            )
            r.raise_for_status()
            if fresh := r.json().get("credential"):
                credentials.append(fresh)
            await asyncio.sleep(0.3)


@contextlib.asynccontextmanager
async def agent(
    coord: Coord, backend: Backend, name: str, refresh: float | None
) -> AsyncIterator[tuple[str, TunnelClient, list[str]]]:
    """A registered worker whose heartbeats renew its credential, with a running tunnel."""
    worker_id, credential = await coord.register(name)
    credentials = [credential]
    client = TunnelClient(
        coord.url,
        lambda: credentials[-1],
        {"svc": backend.url}.get,
        True,
        backoff=Backoff(base=0.05, cap=0.2, jitter=0.5),
        refresh_interval=refresh,
    )
    tasks = [
        asyncio.create_task(client.run()),
        asyncio.create_task(renew_forever(coord, credentials)),
    ]
    try:
        await wait_for(lambda: coord.hub.available(coord.worker(worker_id)), what="tunnel up")
        yield worker_id, client, credentials
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def closed(ws: ClientConnection, within: float) -> tuple[int | None, str]:
    async with asyncio.timeout(within):
        with contextlib.suppress(ConnectionClosed):
            async for _ in ws:
                pass
    return ws.close_code, ws.close_reason or ""


async def test_a_tunnel_is_closed_when_its_credential_expires(short_coord: Coord) -> None:
    worker_id, credential = await short_coord.register("static")
    started = asyncio.get_running_loop().time()
    async with connect(
        tunnel_url(short_coord.url),
        additional_headers={"Authorization": f"Bearer {credential}"},
        subprotocols=[Subprotocol(SUBPROTOCOL)],
    ) as ws:
        await wait_for(lambda: short_coord.hub.available(short_coord.worker(worker_id)))
        code, reason = await closed(ws, within=TTL + 3)
    assert code == 1008
    assert "credential expired" in reason
    assert asyncio.get_running_loop().time() - started >= TTL - 1.5  # not before it expired
    assert not short_coord.hub.available(short_coord.worker(worker_id))


async def test_a_refreshed_credential_keeps_the_tunnel_and_its_streams(
    short_coord: Coord, backend: Backend
) -> None:
    """An SSE answer that spans several credential lifetimes arrives whole, on one tunnel."""
    async with agent(short_coord, backend, "fresh", refresh=0.1) as (worker_id, client, creds):
        w = short_coord.worker(worker_id)
        resp = await short_coord.hub.open(
            w, request("/sse?n=16&delay=0.5&tag=long"), first_byte_timeout=5
        )
        body = b""
        async for chunk in resp.aiter_bytes():
            body += chunk
        await resp.aclose()
        assert body.endswith(b"data: [DONE]\n\n")
        assert body.count(b'"tag": "long"') == 16
        assert len(creds) >= 3  # renewed at least twice while it streamed (8 s, TTL 3 s)
        assert client.connects == 1  # never closed
        assert short_coord.hub.available(w)


async def test_without_refresh_the_agent_reconnects_with_its_renewed_credential(
    short_coord: Coord, backend: Backend
) -> None:
    async with agent(short_coord, backend, "old-style", refresh=None) as (worker_id, client, _):
        await wait_for(lambda: client.connects >= 2, within=TTL + 4, what="the reconnect")
        assert "credential expired" in (client.last_error or "")
        w = short_coord.worker(worker_id)
        await wait_for(lambda: short_coord.hub.available(w), what="the tunnel back")
        resp = await short_coord.hub.open(w, request("/echo"), first_byte_timeout=5)
        assert resp.status == 200
        await resp.aclose()


async def test_a_refresh_with_another_workers_credential_closes_the_tunnel(coord: Coord) -> None:
    worker_id, credential = await coord.register("a")
    _, other = await coord.register("b")
    async with connect(
        tunnel_url(coord.url),
        additional_headers={"Authorization": f"Bearer {credential}"},
        subprotocols=[Subprotocol(SUBPROTOCOL)],
    ) as ws:
        await wait_for(lambda: coord.hub.available(coord.worker(worker_id)))
        await ws.send(encode(FrameType.CREDENTIAL, 0, other.encode()))
        code, reason = await closed(ws, within=5)
    assert code == 1008
    assert "another worker" in reason
    assert not coord.hub.available(coord.worker(worker_id))


async def test_an_agent_of_protocol_1_is_still_served(coord: Coord) -> None:
    """Older agents (no CREDENTIAL frames) connect; they are closed at expiry instead."""
    worker_id, credential = await coord.register("old")
    async with connect(
        tunnel_url(coord.url),
        additional_headers={"Authorization": f"Bearer {credential}"},
        subprotocols=[Subprotocol("rma-tunnel.1")],
    ) as ws:
        assert ws.subprotocol == "rma-tunnel.1"
        await wait_for(lambda: coord.hub.available(coord.worker(worker_id)))
