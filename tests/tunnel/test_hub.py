"""The tunnel end to end below the gateway: ``TunnelHub.open`` -> WebSocket -> ``TunnelClient``
-> a real HTTP backend, and back.  Every part is real and on loopback sockets."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os

import pytest

from rma.coordinator.gateway.upstream import UpstreamError
from rma.schemas.enums import WorkerStatus
from rma.tunnel.frames import INITIAL_WINDOW

from .conftest import Backend, Coord, Worker, request, start_worker, wait_for


async def read_all(resp: object) -> bytes:
    out = b""
    async for chunk in resp.aiter_bytes():  # type: ignore[attr-defined]
        out += chunk
    return out


async def test_get_and_post_round_trip(coord: Coord, worker: Worker) -> None:
    w = coord.worker(worker.id)
    resp = await coord.hub.open(
        w,
        request(
            "/echo?x=1",
            "POST",
            b'{"hello": "world"}',
            [("Content-Type", "application/json"), ("X-Custom", "yes"), ("Connection", "close")],
        ),
        first_byte_timeout=5,
    )
    assert resp.status == 200
    assert ("content-type", "application/json") in resp.headers
    info = json.loads(await read_all(resp))
    await resp.aclose()
    assert info["method"] == "POST"
    assert info["path"] == "/echo"
    assert info["query"] == "x=1"
    assert info["headers"]["x-custom"] == "yes"
    assert info["headers"]["content-length"] == "18"
    assert "connection" not in info["headers"] or info["headers"]["connection"] != "close"
    assert info["sha256"] == hashlib.sha256(b'{"hello": "world"}').hexdigest()

    resp = await coord.hub.open(w, request("/status?code=503"), first_byte_timeout=5)
    assert resp.status == 503  # a service's own status passes through; the gateway decides
    assert await read_all(resp) == b"status"
    await resp.aclose()


async def test_large_bodies_both_ways_arrive_intact(coord: Coord, worker: Worker) -> None:
    w = coord.worker(worker.id)
    body = os.urandom(5 * 1024 * 1024 + 123)
    resp = await coord.hub.open(w, request("/echo?raw=1", "POST", body), first_byte_timeout=10)
    got = await read_all(resp)
    await resp.aclose()
    assert len(got) == len(body)
    assert hashlib.sha256(got).digest() == hashlib.sha256(body).digest()
    assert coord.hub.stats()["tunnel_streams"] == 0  # finished streams are forgotten


async def test_sse_events_arrive_as_produced(
    coord: Coord, worker: Worker, backend: Backend
) -> None:
    """Event i reaches the coordinator before the backend even produces event i+1."""
    w = coord.worker(worker.id)
    gate = backend.gate("g")
    resp = await coord.hub.open(w, request("/sse?n=3&gate=g&tag=s"), first_byte_timeout=5)
    assert resp.status == 200
    it = resp.aiter_bytes()
    got = b""
    for i in range(3):
        gate.put_nowait(None)  # the backend may now produce event i (and no further)
        while b'"i": %d' % i not in got:
            got += await asyncio.wait_for(it.__anext__(), 5)
        assert b'"i": %d' % (i + 1) not in got
    async for chunk in it:  # bytes that arrived together may come in one chunk
        got += chunk
    events = [e.removeprefix(b"data: ") for e in got.split(b"\n\n") if e]
    assert [json.loads(e) for e in events[:-1]] == [{"tag": "s", "i": i} for i in range(3)]
    assert events[-1] == b"[DONE]"
    await resp.aclose()


async def test_64_concurrent_streams_complete_and_in_order(coord: Coord, worker: Worker) -> None:
    w = coord.worker(worker.id)

    async def one(k: int) -> list[int]:
        resp = await coord.hub.open(
            w, request(f"/sse?n=40&delay=0.002&tag=r{k}"), first_byte_timeout=10
        )
        text = (await read_all(resp)).decode()
        await resp.aclose()
        events = [e.removeprefix("data: ") for e in text.split("\n\n") if e]
        assert events[-1] == "[DONE]"
        seen = [json.loads(e) for e in events[:-1]]
        assert {e["tag"] for e in seen} == {f"r{k}"}  # nothing from another stream
        return [e["i"] for e in seen]

    results = await asyncio.gather(*(one(k) for k in range(64)))
    assert all(r == list(range(40)) for r in results)


async def test_slow_consumer_does_not_starve_others(
    coord: Coord, worker: Worker, backend: Backend
) -> None:
    """A response nobody reads stops at its credit window; other streams keep flowing."""
    w = coord.worker(worker.id)
    stuck = await coord.hub.open(w, request("/big?size=50000000"), first_byte_timeout=5)
    await asyncio.sleep(0.5)  # let it fill its window
    stream = stuck._stream  # type: ignore[attr-defined]
    buffered = sum(len(c) for c in stream._chunks)
    assert 0 < buffered <= INITIAL_WINDOW
    for i in range(10):
        resp = await coord.hub.open(w, request(f"/echo?i={i}"), first_byte_timeout=5)
        assert json.loads(await asyncio.wait_for(read_all(resp), 5))["query"] == f"i={i}"
        await resp.aclose()
    assert sum(len(c) for c in stream._chunks) <= INITIAL_WINDOW  # still bounded
    # and the stuck one resumes when read
    got = 0
    async for chunk in stuck.aiter_bytes():
        got += len(chunk)
        if got >= 2 * INITIAL_WINDOW:
            break
    await stuck.aclose()
    assert got >= 2 * INITIAL_WINDOW
    await wait_for(lambda: worker.client.inflight == 0, what="the worker to drop the request")


async def test_client_going_away_cancels_the_upstream_request(
    coord: Coord, worker: Worker, backend: Backend
) -> None:
    w = coord.worker(worker.id)
    resp = await coord.hub.open(w, request("/sse?n=1&forever=1&tag=f"), first_byte_timeout=5)
    first = await resp.aiter_bytes().__anext__()
    assert b'"i": 0' in first
    assert "f" not in backend.disconnects
    await resp.aclose()  # what the gateway does when its client disconnects
    await wait_for(lambda: "f" in backend.disconnects, what="the backend to see the disconnect")
    await wait_for(lambda: worker.client.inflight == 0, what="the worker to drop the request")


async def test_first_byte_timeout_is_retryable_and_cancels_upstream(
    coord: Coord, worker: Worker, backend: Backend
) -> None:
    w = coord.worker(worker.id)
    with pytest.raises(UpstreamError) as info:
        await coord.hub.open(w, request("/hang?tag=h"), first_byte_timeout=0.3)
    assert info.value.retryable
    assert "no response head within 0.3 s" in str(info.value)
    await wait_for(lambda: "h" in backend.disconnects, what="the backend to see the cancel")


async def test_cancelled_open_cancels_upstream(
    coord: Coord, worker: Worker, backend: Backend
) -> None:
    """The gateway's task cancelled while waiting for headers (client gone): the worker stops."""
    w = coord.worker(worker.id)
    task = asyncio.create_task(coord.hub.open(w, request("/hang?tag=c"), first_byte_timeout=30))
    await wait_for(lambda: "c" in backend.started, what="the request to reach the backend")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await wait_for(lambda: "c" in backend.disconnects, what="the backend to see the cancel")


async def test_worker_without_the_service_is_a_retryable_failure(
    coord: Coord, worker: Worker
) -> None:
    w = coord.worker(worker.id)
    with pytest.raises(UpstreamError) as info:
        await coord.hub.open(w, request("/x", service="nope"), first_byte_timeout=5)
    assert info.value.retryable
    assert "service nope is not running" in str(info.value)


async def test_unreachable_service_is_a_retryable_failure(coord: Coord, backend: Backend) -> None:
    from .conftest import free_port

    w = await start_worker(coord, {"svc": f"http://127.0.0.1:{free_port()}"})
    try:
        with pytest.raises(UpstreamError) as info:
            await coord.hub.open(coord.worker(w.id), request("/echo"), first_byte_timeout=5)
        assert info.value.retryable
        assert "unreachable" in str(info.value)
    finally:
        await w.stop()


async def test_worker_drop_before_and_after_first_byte(
    coord: Coord, worker: Worker, backend: Backend
) -> None:
    w = coord.worker(worker.id)
    streaming = await coord.hub.open(w, request("/sse?n=1&forever=1&tag=a"), first_byte_timeout=5)
    assert b'"i": 0' in await streaming.aiter_bytes().__anext__()
    pending = asyncio.create_task(coord.hub.open(w, request("/hang?tag=b"), first_byte_timeout=30))
    await wait_for(lambda: "b" in backend.started, what="the request to reach the backend")

    await worker.stop()  # the agent dies: its tunnel with it

    with pytest.raises(UpstreamError) as before:
        await asyncio.wait_for(pending, 5)
    assert before.value.retryable  # nothing reached the client: the gateway may retry
    with pytest.raises(UpstreamError) as after:
        await asyncio.wait_for(read_all(streaming), 5)
    assert not after.value.retryable  # bytes were already sent: a broken stream
    await streaming.aclose()
    # out of routing at once, but liveness is the sweeper's business
    assert not coord.hub.available(w)
    assert coord.worker(worker.id).status is WorkerStatus.ONLINE
    with pytest.raises(UpstreamError) as none:
        await coord.hub.open(w, request("/echo"), first_byte_timeout=5)
    assert none.value.retryable
    assert "no tunnel" in str(none.value)
    await wait_for(lambda: {"a", "b"} <= set(backend.disconnects), what="upstream requests cut")


async def test_reconnects_after_the_coordinator_drops_it(coord: Coord, worker: Worker) -> None:
    w = coord.worker(worker.id)
    assert worker.client.connects == 1
    coord.hub.disconnect(worker.id, "test")
    assert not coord.hub.available(w)  # at once
    await wait_for(lambda: worker.client.connects == 2, what="the reconnect")
    await wait_for(lambda: coord.hub.available(w), what="the tunnel back")
    resp = await coord.hub.open(w, request("/echo"), first_byte_timeout=5)
    assert resp.status == 200
    await resp.aclose()


async def test_removed_worker_loses_its_tunnel_and_cannot_reopen(
    coord: Coord, worker: Worker
) -> None:
    async with coord.admin() as c:
        r = await c.delete(f"/api/admin/workers/{worker.id}")
        assert r.status_code == 200, r.text
    await wait_for(lambda: not worker.client.connected, what="the tunnel to close")
    await asyncio.sleep(0.5)  # it keeps trying, and is refused
    assert not coord.hub.available(coord.worker(worker.id))
    assert worker.client.connects == 1
    assert "HTTP 401" in (worker.client.last_error or "")
    assert "removed" in (worker.client.last_error or "")


async def test_events_record_tunnel_up_and_down(coord: Coord, worker: Worker) -> None:
    await worker.stop()

    async def kinds() -> list[str]:
        async with coord.admin() as c:
            r = await c.get("/api/admin/events", params={"limit": 100})
            return [e["kind"] for e in r.json() if e["worker_id"] == worker.id]

    for _ in range(200):
        if "tunnel_down" in await kinds():
            break
        await asyncio.sleep(0.02)
    assert {"tunnel_up", "tunnel_down"} <= set(await kinds())
