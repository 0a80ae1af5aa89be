"""One request/response exchange inside a tunnel: a head, a body each way, credit windows."""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from rma.tunnel.frames import (
    FIN,
    INITIAL_WINDOW,
    MAX_DATA,
    WINDOW_INCREMENT,
    FrameType,
    encode,
    encode_head,
    encode_json,
)

#: Grant credit back once the consumer has read this much (a quarter window keeps the pipe full).
WINDOW_UPDATE_AT = INITIAL_WINDOW // 4


class TunnelClosed(Exception):
    """The tunnel connection went away (every open stream fails with this)."""


class StreamReset(Exception):
    """The peer aborted the stream; ``code`` says why (``cancelled``, ``unreachable``, ...)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}" if message else code)
        self.code = code
        self.message = message


class FlowControlError(Exception):
    """The peer sent more than its credit."""


Send = Callable[[bytes], Awaitable[None]]


class Stream:
    """Both directions of one stream.  One reader and one writer at a time."""

    __slots__ = (
        "_chunks",
        "_credit",
        "_credit_ready",
        "_error",
        "_head",
        "_head_ready",
        "_local_fin",
        "_on_done",
        "_ready",
        "_recv_window",
        "_remote_fin",
        "_send",
        "_unacked",
        "id",
        "on_reset",
    )

    def __init__(self, stream_id: int, send: Send, on_done: Callable[[Stream], None]) -> None:
        self.id = stream_id
        self._send = send
        self._on_done = on_done
        self._chunks: deque[bytes] = deque()
        self._ready = asyncio.Event()
        self._remote_fin = False
        self._error: BaseException | None = None
        self._unacked = 0
        self._recv_window = INITIAL_WINDOW
        self._credit = INITIAL_WINDOW
        self._credit_ready = asyncio.Event()
        self._local_fin = False
        self._head: dict[str, Any] | None = None
        self._head_ready = asyncio.Event()
        #: Called (synchronously) when the peer resets the stream or the tunnel dies.
        self.on_reset: Callable[[BaseException], None] | None = None

    # --- state ------------------------------------------------------------------------------------

    @property
    def failed(self) -> bool:
        return self._error is not None

    @property
    def finished(self) -> bool:
        """Both directions ended cleanly (or the stream failed)."""
        return self._error is not None or (self._local_fin and self._remote_fin)

    @property
    def remote_ended(self) -> bool:
        """The peer finished sending (its data may still be buffered here)."""
        return self._remote_fin

    @property
    def exhausted(self) -> bool:
        """The peer finished sending and everything was read."""
        return self._remote_fin and not self._chunks

    def _check_done(self) -> None:
        if self.finished:
            self._on_done(self)

    # --- events from the peer (called by the mux, never block) ------------------------------------

    def on_head(self, head: dict[str, Any], body: bytes, fin: bool) -> None:
        self._head = head
        self._head_ready.set()
        if body or fin:
            self.on_data(body, fin)

    def on_data(self, payload: bytes, fin: bool) -> None:
        if self._error is not None:
            return
        if payload:
            if len(payload) > self._recv_window:
                raise FlowControlError(
                    f"stream {self.id}: {len(payload)} bytes sent with {self._recv_window} credit"
                )
            self._recv_window -= len(payload)
            self._chunks.append(payload)
        if fin:
            self._remote_fin = True
        self._ready.set()
        if fin:
            self._check_done()

    def on_window(self, increment: int) -> None:
        self._credit += increment
        self._credit_ready.set()

    def fail(self, error: BaseException, *, notify: bool = True) -> None:
        """The peer reset the stream, or the tunnel died (``notify``: call :attr:`on_reset`)."""
        if self._error is not None:
            return
        self._error = error
        self._ready.set()
        self._credit_ready.set()
        self._head_ready.set()
        self._on_done(self)
        if notify and self.on_reset is not None:
            self.on_reset(error)

    # --- the local side ---------------------------------------------------------------------------

    async def head(self) -> dict[str, Any]:
        """The peer's OPEN/HEAD payload; raises when the stream failed first."""
        await self._head_ready.wait()
        if self._head is None:
            assert self._error is not None
            raise self._error
        return self._head

    async def read(self) -> bytes | None:
        """The next body bytes from the peer, ``None`` at the end; raises if the stream failed.

        Chunks that arrived since the last read come joined (up to :data:`MAX_DATA` bytes):
        fewer writes downstream, and no added delay.
        """
        while True:
            if self._chunks:
                chunks = self._chunks
                chunk = chunks.popleft()
                if chunks and len(chunk) + len(chunks[0]) <= MAX_DATA:
                    parts, size = [chunk], len(chunk)
                    while chunks and size + len(chunks[0]) <= MAX_DATA:
                        parts.append(chunks.popleft())
                        size += len(parts[-1])
                    chunk = b"".join(parts)
                self._unacked += len(chunk)
                if self._unacked >= WINDOW_UPDATE_AT and not self._remote_fin:
                    grant, self._unacked = self._unacked, 0
                    self._recv_window += grant
                    if self._error is None:
                        await self._send(
                            encode(FrameType.WINDOW, self.id, WINDOW_INCREMENT.pack(grant))
                        )
                return chunk
            if self._remote_fin:
                return None
            if self._error is not None:
                raise self._error
            self._ready.clear()
            await self._ready.wait()

    async def send_head(
        self, kind: FrameType, head: dict[str, Any], body: bytes = b"", *, fin: bool
    ) -> None:
        """OPEN or HEAD, with up to :data:`MAX_DATA` bytes of body inline (within the credit)."""
        self._raise_if_failed()
        if len(body) > min(MAX_DATA, self._credit):
            raise ValueError("inline body larger than the credit allows")
        self._credit -= len(body)
        await self._send(encode(kind, self.id, encode_head(head, body), FIN if fin else 0))
        if fin:
            self._local_fin = True
            self._check_done()

    async def write(self, data: bytes, *, fin: bool = False) -> None:
        """Send body bytes, waiting for credit; ``fin`` ends this direction."""
        view = memoryview(data)
        while view or fin:
            self._raise_if_failed()
            if view and self._credit <= 0:
                self._credit_ready.clear()
                await self._credit_ready.wait()
                continue
            n = min(len(view), self._credit, MAX_DATA)
            last = n == len(view)
            flags = FIN if (last and fin) else 0
            self._credit -= n
            await self._send(encode(FrameType.DATA, self.id, bytes(view[:n]), flags))
            view = view[n:]
            if last:
                break
        if fin:
            self._local_fin = True
            self._check_done()

    async def reset(self, code: str, message: str = "") -> None:
        """Abort the stream: tell the peer, fail local waiters.  Safe to call more than once."""
        if self._error is not None or (self._local_fin and self._remote_fin):
            return
        self.fail(StreamReset(code, message), notify=False)
        frame = encode(FrameType.RESET, self.id, encode_json({"code": code, "message": message}))
        with contextlib.suppress(TunnelClosed):
            await self._send(frame)

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error
