"""The pooled HTTP/1.1 client the gateway and the tunnel use, against raw sockets that misbehave."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from rma._http1 import MAX_HEADER_BYTES, H1Client, H1Error

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class Raw:
    """A raw TCP server; every connection is closed when the test ends."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.writers: list[asyncio.StreamWriter] = []
        self.tasks: set[asyncio.Task[None]] = set()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)  # type: ignore[arg-type]
        try:
            await self.handler(reader, writer)
        finally:
            writer.close()

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for w in self.writers:
            w.close()
            with contextlib.suppress(Exception):
                await w.wait_closed()
        await self.server.wait_closed()


async def read_request(reader: asyncio.StreamReader) -> None:
    while (await reader.readline()) not in (b"\r\n", b""):
        pass


async def body_of(chunks: AsyncIterator[bytes]) -> bytes:
    return b"".join([c async for c in chunks])


async def test_interim_1xx_responses_are_skipped() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Final: yes\r\n\r\nhello")
        await writer.drain()
        await asyncio.sleep(0.2)

    client = H1Client(2.0)
    async with Raw(handler) as url:
        try:
            resp = await client.send("GET", url, "/", [], b"")
            assert resp.status == 200
            assert ("X-Final", "yes") in resp.headers
            assert all(k.lower() != "link" for k, _ in resp.headers)
            assert await body_of(resp.aiter_bytes()) == b"hello"
        finally:
            await client.aclose()


async def test_endless_headers_are_refused() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\n")
        line = b"X-Junk: " + b"a" * 1000 + b"\r\n"
        for _ in range(MAX_HEADER_BYTES // 1000 + 10):
            writer.write(line)
        await writer.drain()
        await asyncio.sleep(1)

    client = H1Client(2.0)
    async with Raw(handler) as url:
        try:
            with pytest.raises(H1Error, match="bad HTTP response"):
                await asyncio.wait_for(client.send("GET", url, "/", [], b""), 5)
        finally:
            await client.aclose()
