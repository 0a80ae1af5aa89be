"""TCP connections through the tunnel (``rma connect``): ``TunnelHub.open_tcp`` -> WebSocket ->
``TunnelClient`` -> a real TCP server on loopback, and back; several at once, half-close, and
the agent's refusals (it connects only to the TCP services it runs, never where it is told)."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator

import pytest

from rma.coordinator.gateway.upstream import UpstreamError
from rma.tunnel.stream import Stream

from .conftest import Coord, free_port, start_worker


@contextlib.asynccontextmanager
async def echo_server() -> AsyncIterator[int]:
    """Echoes every byte; at the client's EOF, closes its side too."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield int(server.sockets[0].getsockname()[1])
    finally:
        server.close()
        await server.wait_closed()


async def read_to_end(stream: Stream) -> bytes:
    out = bytearray()
    while (chunk := await stream.read()) is not None:
        out += chunk
    return bytes(out)


async def test_bytes_both_ways_several_at_once(coord: Coord) -> None:
    async with echo_server() as port:
        w = await start_worker(coord, {}, tcp_endpoints={"db": ("127.0.0.1", port)}.get)
        try:
            state = coord.worker(w.id)

            async def one(size: int) -> bytes:
                stream = await coord.hub.open_tcp(state, "db", limit=5)
                payload = os.urandom(size)
                writer = asyncio.create_task(stream.write(payload, fin=True))  # then half-close
                got = await read_to_end(stream)  # the echo closes once it saw our end
                await writer
                assert stream.finished
                return got if got == payload else b"mismatch"

            sizes = [10, 70_000, 1_500_000, 3_000, 600_000]  # past the 256 KiB credit windows
            results = await asyncio.gather(*(one(n) for n in sizes))
            assert [len(r) for r in results] == sizes
            assert w.client.tcp_connections == 0  # every connection closed on the agent's side
        finally:
            await w.stop()


async def test_agent_refuses_what_it_does_not_run(coord: Coord) -> None:
    closed = free_port()  # nothing listens there
    tcp = {"db": ("127.0.0.1", closed)}
    w = await start_worker(coord, {"web": "http://127.0.0.1:9"}, tcp_endpoints=tcp.get)
    try:
        state = coord.worker(w.id)
        with pytest.raises(UpstreamError, match="no healthy TCP service web"):
            await coord.hub.open_tcp(state, "web", limit=5)  # an HTTP service: never raw TCP
        with pytest.raises(UpstreamError, match="no healthy TCP service nosuch"):
            await coord.hub.open_tcp(state, "nosuch", limit=5)
        with pytest.raises(UpstreamError, match="unreachable"):
            await coord.hub.open_tcp(state, "db", limit=5)  # its port refuses
    finally:
        await w.stop()


async def test_the_service_closing_ends_the_stream(coord: Coord) -> None:
    async def hello_and_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"bye\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(hello_and_close, "127.0.0.1", 0)
    port = int(server.sockets[0].getsockname()[1])
    w = await start_worker(coord, {}, tcp_endpoints={"db": ("127.0.0.1", port)}.get)
    try:
        stream = await coord.hub.open_tcp(coord.worker(w.id), "db", limit=5)
        assert await read_to_end(stream) == b"bye\n"
        await stream.write(b"", fin=True)
        assert stream.finished
    finally:
        await w.stop()
        server.close()
        await server.wait_closed()
