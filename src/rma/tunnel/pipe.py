"""A raw TCP connection carried by one tunnel stream (data services: ``rma connect``).

The coordinator opens the stream with an ``OPEN`` head ``{service, method: "CONNECT", tcp:
true}``; the worker connects to the service's local port and answers ``HEAD {status: 200}`` (or
``RESET`` with ``no_service`` / ``unreachable``).  From then on ``DATA`` frames carry the bytes
each way, under the stream's credit windows; ``FIN`` is a half-close (``shutdown(SHUT_WR)``), and
the stream is finished once both sides ended.  :func:`splice` joins a stream to a socket.
"""

from __future__ import annotations

import asyncio
import contextlib

from rma.tunnel.frames import MAX_DATA
from rma.tunnel.stream import Stream, StreamReset, TunnelClosed


def connect_head(service: str) -> dict[str, object]:
    """The ``OPEN`` head of a TCP stream to ``service``."""
    return {"service": service, "method": "CONNECT", "path": "/", "headers": [], "tcp": True}


async def splice(stream: Stream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> str:
    """Copy bytes both ways until both directions ended; returns how it ended.

    A socket error resets the stream; a reset or a dead tunnel closes the socket.  Either way
    the socket is closed when this returns.
    """

    async def up() -> None:  # socket -> stream
        while data := await reader.read(MAX_DATA):
            await stream.write(data)
        await stream.write(b"", fin=True)

    async def down() -> None:  # stream -> socket
        while (chunk := await stream.read()) is not None:
            writer.write(chunk)
            await writer.drain()
        if writer.can_write_eof():
            with contextlib.suppress(OSError):
                writer.write_eof()

    tasks = [asyncio.create_task(up()), asyncio.create_task(down())]
    outcome = "closed"
    try:
        pending: set[asyncio.Task[None]] = set(tasks)
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                exc = task.exception()
                if exc is None:
                    continue
                for other in pending:
                    other.cancel()
                if isinstance(exc, (StreamReset, TunnelClosed)):
                    outcome = f"stream ended: {exc}"
                else:
                    outcome = f"socket failed: {type(exc).__name__}: {exc}"
                    await stream.reset("broken", outcome)
                pending = set()
                break
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    return outcome
