"""Who may open a tunnel, and what happens to one that goes silent."""

from __future__ import annotations

import asyncio
import json

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus
from websockets.typing import Subprotocol

from rma.agent.tunnel import tunnel_url
from rma.tunnel.frames import SUBPROTOCOL

from .conftest import Coord, Worker, wait_for


async def refused(
    coord: Coord, headers: dict[str, str], proto: str = SUBPROTOCOL
) -> tuple[int, dict]:  # type: ignore[type-arg]
    with pytest.raises(InvalidStatus) as info:
        async with connect(
            tunnel_url(coord.url),
            additional_headers=headers,
            subprotocols=[Subprotocol(proto)],
            open_timeout=5,
        ):
            pass
    resp = info.value.response
    return resp.status_code, json.loads(resp.body or b"{}")


async def test_refused_without_a_valid_worker_credential(coord: Coord) -> None:
    status, body = await refused(coord, {})
    assert status == 401
    assert "worker credential required" in body["error"]["message"]
    status, body = await refused(coord, {"Authorization": "Bearer eyJx.eyJy.zzz"})
    assert (status, body["error"]["code"]) == (401, "invalid_credential")
    status, body = await refused(coord, {"Authorization": f"Bearer {coord.admin_key}"})
    assert (status, body["error"]["code"]) == (403, "forbidden")
    assert coord.hub.connected() == []


async def test_refused_when_the_protocol_version_differs(coord: Coord) -> None:
    _, credential = await coord.register("old-agent")
    status, body = await refused(coord, {"Authorization": f"Bearer {credential}"}, "rma-tunnel.0")
    assert status == 400
    assert body["error"]["code"] == "unsupported_protocol"
    assert "upgrade rma" in body["error"]["message"]


async def test_tunnel_url() -> None:
    assert tunnel_url("http://h:1") == "ws://h:1/api/worker/tunnel"
    assert tunnel_url("https://h/prefix/") == "wss://h/prefix/api/worker/tunnel"
    with pytest.raises(ValueError, match="not an http"):
        tunnel_url("ftp://h")


async def test_a_silent_worker_is_dropped_after_the_ping_timeout(coord: Coord) -> None:
    """A peer that stops answering (network gone, process frozen) is out of routing in time.

    This client completes the handshake and then never reads: it answers no PING (the hub's
    ping timeout here is 2 s, interval 0.5 s).
    """
    worker_id, credential = await coord.register("frozen")
    async with connect(
        tunnel_url(coord.url),
        additional_headers={"Authorization": f"Bearer {credential}"},
        subprotocols=[Subprotocol(SUBPROTOCOL)],
        ping_interval=None,
    ):
        await wait_for(lambda: coord.hub.available(coord.worker(worker_id)), what="tunnel up")
        started = asyncio.get_running_loop().time()
        await wait_for(
            lambda: not coord.hub.available(coord.worker(worker_id)), within=6, what="drop"
        )
        assert asyncio.get_running_loop().time() - started >= 1.0


async def test_a_new_tunnel_replaces_the_old_one(coord: Coord, worker: Worker) -> None:
    """An agent that reconnects before the old connection is noticed dead takes over."""
    async with connect(
        tunnel_url(coord.url),
        additional_headers={"Authorization": f"Bearer {worker.credential}"},
        subprotocols=[Subprotocol(SUBPROTOCOL)],
    ) as ws:
        await wait_for(lambda: not worker.client.connected, what="the old tunnel to be closed")
        assert coord.hub.available(coord.worker(worker.id))  # the new one serves
        await ws.close()
