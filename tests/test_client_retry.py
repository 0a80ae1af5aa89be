"""The agent's client and a coordinator that closed a kept-alive connection just before.

A real socket server (asyncio) answers the first request on a connection with keep-alive, then
closes the connection without answering the next one, as a server whose keep-alive timeout ran
out does.  An idempotent call (a heartbeat, a GET) is sent again on a new connection at once; a
non-idempotent one (a registration) is not.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from rma.client import CoordinatorClient, RmaError
from rma.schemas.api import HeartbeatRequest

BODY = json.dumps({"assignments": [], "heartbeat_interval": 30, "status": "online"}).encode()


async def _server() -> tuple[asyncio.Server, list[int]]:
    """Answers once per connection, then drops the connection on the next request."""
    answered: list[int] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        served = 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                await reader.readexactly(length)
                if served:
                    return  # the keep-alive timeout passed: closed without an answer
                served += 1
                answered.append(1)
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
    return server, answered


async def test_a_heartbeat_on_a_connection_the_server_closed_is_sent_again() -> None:
    server, answered = await _server()
    port = server.sockets[0].getsockname()[1]
    client = CoordinatorClient(f"http://127.0.0.1:{port}", credential="c", timeout=5)
    try:
        async with server:
            for _ in range(3):  # every second request meets the closed connection
                resp = await client.heartbeat(HeartbeatRequest())
                assert resp.heartbeat_interval == 30
            assert len(answered) == 3
    finally:
        await client.aclose()


async def test_a_registration_is_not_sent_twice() -> None:
    server, answered = await _server()
    port = server.sockets[0].getsockname()[1]
    client = CoordinatorClient(f"http://127.0.0.1:{port}", timeout=5)
    try:
        async with server:
            await client.request("POST", "/api/worker/register", role="worker", json_body={})
            with pytest.raises(RmaError):
                await client.request("POST", "/api/worker/register", role="worker", json_body={})
            assert len(answered) == 1
    finally:
        await client.aclose()
