"""The wire format and the credit windows, on two muxes wired back to back in memory.

No sockets here on purpose: these pin down frame encoding and flow-control arithmetic, which a
socket would only make slower and less deterministic (the socket paths are in test_hub.py).
"""

from __future__ import annotations

import asyncio

import pytest

from rma.tunnel.frames import (
    FIN,
    INITIAL_WINDOW,
    MAX_DATA,
    FrameType,
    ProtocolError,
    decode,
    encode,
    end_to_end,
)
from rma.tunnel.mux import Mux
from rma.tunnel.stream import Stream, StreamReset, TunnelClosed


def test_frames_round_trip() -> None:
    frame = encode(FrameType.DATA, 7, b"hello", FIN)
    assert len(frame) == 6 + 5
    assert decode(frame) == (FrameType.DATA, FIN, 7, b"hello")
    with pytest.raises(ProtocolError, match="shorter"):
        decode(b"\x03\x00")
    with pytest.raises(ProtocolError, match="unknown frame type 99"):
        decode(bytes([99, 0, 0, 0, 0, 1]))


def test_hop_by_hop_headers_are_not_forwarded() -> None:
    got = end_to_end(
        [("Connection", "x"), ("Transfer-Encoding", "chunked"), ("X-A", "1"), ("Host", "h")],
        drop=frozenset({"host"}),
    )
    assert got == [("x-a", "1")]


class Pair:
    """A coordinator mux and a worker mux; frames delivered in order, by a pump task."""

    def __init__(self) -> None:
        self.opened: list[Stream] = []
        self.to_worker: asyncio.Queue[bytes] = asyncio.Queue()
        self.to_coord: asyncio.Queue[bytes] = asyncio.Queue()
        self.coord = Mux(self._put(self.to_worker))
        self.worker = Mux(self._put(self.to_coord), on_open=self.opened.append)
        self.tasks = [
            asyncio.create_task(self._pump(self.to_worker, self.worker)),
            asyncio.create_task(self._pump(self.to_coord, self.coord)),
        ]

    @staticmethod
    def _put(q: asyncio.Queue[bytes]):  # type: ignore[no-untyped-def]
        async def send(frame: bytes) -> None:
            q.put_nowait(frame)

        return send

    @staticmethod
    async def _pump(q: asyncio.Queue[bytes], mux: Mux) -> None:
        while True:
            await mux.feed(await q.get())

    async def settle(self) -> None:
        for _ in range(20):
            await asyncio.sleep(0)

    def close(self) -> None:
        for t in self.tasks:
            t.cancel()


async def test_sender_stops_at_the_window_and_resumes_as_the_reader_reads() -> None:
    pair = Pair()
    s = pair.coord.open_stream()
    await s.send_head(FrameType.OPEN, {"path": "/"}, fin=False)
    payload = b"x" * (INITIAL_WINDOW + 3 * MAX_DATA)
    writer = asyncio.create_task(s.write(payload, fin=True))
    await pair.settle()
    (w,) = pair.opened
    assert not writer.done()  # blocked: credit used up
    assert sum(len(c) for c in w._chunks) == INITIAL_WINDOW
    got = b""
    while (chunk := await w.read()) is not None:
        assert len(chunk) <= MAX_DATA
        got += chunk
    await asyncio.wait_for(writer, 2)
    assert got == payload
    pair.close()


async def test_a_peer_that_ignores_its_window_gets_its_stream_reset() -> None:
    pair = Pair()
    s = pair.coord.open_stream()
    await s.send_head(FrameType.OPEN, {}, fin=False)
    await pair.settle()
    for _ in range(INITIAL_WINDOW // MAX_DATA + 1):  # raw frames, past the credit
        await pair.coord.send(encode(FrameType.DATA, s.id, b"y" * MAX_DATA))
    await pair.settle()
    (w,) = pair.opened
    assert w.failed
    with pytest.raises(StreamReset, match="flow_control"):
        await s.head()
    pair.close()


async def test_reset_reaches_the_other_side_and_its_callback() -> None:
    pair = Pair()
    s = pair.coord.open_stream()
    await s.send_head(FrameType.OPEN, {}, fin=True)
    await pair.settle()
    (w,) = pair.opened
    seen: list[BaseException] = []
    w.on_reset = seen.append
    await s.reset("cancelled", "the client went away")
    await pair.settle()
    assert isinstance(seen[0], StreamReset)
    assert seen[0].code == "cancelled"
    with pytest.raises(StreamReset):
        await w.write(b"late")
    assert pair.worker.streams == {}
    assert pair.coord.streams == {}
    pair.close()


async def test_closing_the_tunnel_fails_every_stream() -> None:
    pair = Pair()
    streams = [pair.coord.open_stream() for _ in range(3)]
    pair.coord.close("gone")
    for s in streams:
        with pytest.raises(TunnelClosed, match="gone"):
            await s.read()
    with pytest.raises(TunnelClosed):
        pair.coord.open_stream()
    pair.close()


async def test_ping_is_answered() -> None:
    pair = Pair()
    before = pair.coord.last_seen
    await asyncio.sleep(0.01)
    await pair.coord.ping()
    await pair.settle()
    assert pair.coord.last_seen > before
    pair.close()


async def test_open_from_the_worker_is_a_protocol_error() -> None:
    pair = Pair()
    with pytest.raises(ProtocolError, match="coordinator to worker only"):
        await pair.coord.feed(encode(FrameType.OPEN, 1, b"{}"))
    with pytest.raises(ProtocolError, match="worker to coordinator only"):
        await pair.worker.feed(encode(FrameType.HEAD, 1, b"{}"))
    pair.close()
