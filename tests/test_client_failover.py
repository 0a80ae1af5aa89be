"""The client with several coordinators (``--coordinator URL1,URL2``): failover to the next.

Real sockets: a port nothing listens on (a dead coordinator), a server that answers heartbeats,
and one that accepts a request and closes without answering.
"""

from __future__ import annotations

import asyncio
import json

import pytest
from tests.conftest import free_port

from rma.agent.policy import coordinator_problem
from rma.client import CoordinatorClient, Coordinators, RmaError, split_urls
from rma.schemas.api import HeartbeatRequest

BODY = json.dumps({"assignments": [], "heartbeat_interval": 30, "status": "online"}).encode()


async def _server(answer: bool) -> tuple[asyncio.Server, list[bytes]]:
    """Answers every request with a heartbeat answer, or (``answer`` false) hangs up on it."""
    seen: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                await reader.readexactly(length)
                seen.append(head.split(b"\r\n", 1)[0])
                if not answer:
                    return
                writer.write(
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                    b"content-length: %d\r\n\r\n%s" % (len(BODY), BODY)
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, seen


def _url(server: asyncio.Server) -> str:
    return f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"


def test_urls_are_split_and_a_single_one_is_a_list_of_one() -> None:
    assert split_urls("http://a:1/, http://b:2") == ["http://a:1", "http://b:2"]
    assert split_urls("http://a:1") == ["http://a:1"]
    urls = Coordinators("http://a:1,http://b:2")
    assert urls.current == "http://a:1"
    assert urls.failed("http://a:1") and urls.current == "http://b:2"
    assert urls.failed("http://a:1") and urls.current == "http://b:2"  # a stale failure: no move
    assert urls.failovers == 1
    assert not Coordinators("http://a:1").failed("http://a:1")  # nowhere to go


def test_every_url_is_checked_for_plain_http() -> None:
    assert coordinator_problem("http://127.0.0.1:1,https://pool.example", insecure=False) is None
    problem = coordinator_problem("http://127.0.0.1:1,http://pool.example", insecure=False)
    assert problem is not None and "pool.example" in problem


async def test_a_heartbeat_moves_to_the_next_coordinator_when_one_is_dead() -> None:
    server, seen = await _server(answer=True)
    dead = f"http://127.0.0.1:{free_port()}"
    client = CoordinatorClient(f"{dead},{_url(server)}", credential="c", timeout=5)
    try:
        async with server:
            resp = await client.heartbeat(HeartbeatRequest())
            assert resp.status.value == "online"
            assert client.base_url == _url(server)
            await client.heartbeat(HeartbeatRequest())  # stays with the live one
        assert len(seen) == 2
        assert client.urls.failovers == 1
    finally:
        await client.aclose()


async def test_a_call_that_may_have_been_done_is_not_sent_twice() -> None:
    hangs_up, first = await _server(answer=False)
    live, second = await _server(answer=True)
    client = CoordinatorClient(f"{_url(hangs_up)},{_url(live)}", credential="c", timeout=5)
    try:
        async with hangs_up, live:
            with pytest.raises(RmaError):
                await client.leave()  # sent, no answer: maybe done, so not sent again
            assert (len(first), len(second)) == (1, 0)
            assert client.base_url == _url(live)  # the next call goes to the other one
            await client.heartbeat(HeartbeatRequest())
            assert len(second) == 1
    finally:
        await client.aclose()


async def test_one_dead_coordinator_is_still_an_unreachable_error() -> None:
    client = CoordinatorClient(f"http://127.0.0.1:{free_port()}", credential="c", timeout=5)
    try:
        with pytest.raises(RmaError) as info:
            await client.heartbeat(HeartbeatRequest())
        assert info.value.code == "unreachable"
    finally:
        await client.aclose()
