"""Many streams over one WebSocket: frame dispatch, stream ids, keepalive, failure of the whole.

Role-neutral: the coordinator opens streams (:meth:`Mux.open_stream`), the worker accepts them
(``on_open``).  The owner runs the read loop and hands every binary message to :meth:`Mux.feed`,
which never blocks on a slow stream (only on answering a ``PING``).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from rma.tunnel.frames import (
    FIN,
    WINDOW_INCREMENT,
    FrameType,
    ProtocolError,
    decode,
    decode_head,
    decode_json,
    encode,
)
from rma.tunnel.stream import FlowControlError, Send, Stream, StreamReset, TunnelClosed

#: Highest stream id; the coordinator wraps around (ids of finished streams are free again).
MAX_STREAM_ID = 0xFFFFFFFF


class Mux:
    def __init__(
        self,
        send: Send,
        *,
        on_open: Callable[[Stream], None] | None = None,
        on_credential: Callable[[bytes], None] | None = None,
    ) -> None:
        self._raw_send = send
        self._on_open = on_open
        #: Coordinator side: called with the payload of each ``CREDENTIAL`` frame.
        self._on_credential = on_credential
        self.streams: dict[int, Stream] = {}
        self._next_id = 1
        self._error: TunnelClosed | None = None
        #: ``time.monotonic()`` of the last frame received (keepalive).
        self.last_seen = time.monotonic()
        self.opened = 0

    @property
    def closed(self) -> bool:
        return self._error is not None

    @property
    def close_reason(self) -> str:
        return str(self._error) if self._error else ""

    async def send(self, frame: bytes) -> None:
        if self._error is not None:
            raise self._error
        try:
            await self._raw_send(frame)
        except Exception as exc:
            self.close(f"send failed: {type(exc).__name__}: {exc}")
            assert self._error is not None
            raise self._error from exc

    def _done(self, stream: Stream) -> None:
        if self.streams.get(stream.id) is stream:
            del self.streams[stream.id]

    def open_stream(self) -> Stream:
        """A new stream, to be started with an ``OPEN`` head (coordinator side)."""
        if self._error is not None:
            raise self._error
        while True:
            sid = self._next_id
            self._next_id = 1 if sid >= MAX_STREAM_ID else sid + 1
            if sid not in self.streams:
                break
        stream = Stream(sid, self.send, self._done)
        self.streams[sid] = stream
        self.opened += 1
        return stream

    async def ping(self) -> None:
        await self.send(encode(FrameType.PING, 0, time.monotonic_ns().to_bytes(8, "big")))

    async def feed(self, data: bytes) -> None:
        """Dispatch one frame from the peer.  Raises :class:`ProtocolError` on nonsense."""
        self.last_seen = time.monotonic()
        kind, flags, sid, payload = decode(data)
        fin = bool(flags & FIN)
        if kind is FrameType.DATA:
            stream = self.streams.get(sid)
            if stream is not None:
                try:
                    stream.on_data(payload, fin)
                except FlowControlError as exc:
                    await stream.reset("flow_control", str(exc))
        elif kind is FrameType.WINDOW:
            if len(payload) != WINDOW_INCREMENT.size:
                raise ProtocolError("WINDOW frame payload must be 4 bytes")
            stream = self.streams.get(sid)
            if stream is not None:
                stream.on_window(WINDOW_INCREMENT.unpack(payload)[0])
        elif kind is FrameType.RESET:
            stream = self.streams.get(sid)
            if stream is not None:
                body = decode_json(payload)
                stream.fail(
                    StreamReset(str(body.get("code", "reset")), str(body.get("message", "")))
                )
        elif kind is FrameType.HEAD:
            if self._on_open is not None:
                raise ProtocolError("HEAD frames go from worker to coordinator only")
            stream = self.streams.get(sid)
            if stream is not None:
                stream.on_head(*decode_head(payload), fin)
        elif kind is FrameType.OPEN:
            if self._on_open is None:
                raise ProtocolError("OPEN frames go from coordinator to worker only")
            if sid in self.streams or sid == 0:
                raise ProtocolError(f"OPEN for stream {sid}, which is in use")
            stream = Stream(sid, self.send, self._done)
            self.streams[sid] = stream
            self.opened += 1
            stream.on_head(*decode_head(payload), fin)
            self._on_open(stream)
        elif kind is FrameType.PING:
            await self.send(encode(FrameType.PONG, 0, payload))
        elif kind is FrameType.CREDENTIAL:
            if self._on_open is not None:
                raise ProtocolError("CREDENTIAL frames go from worker to coordinator only")
            if self._on_credential is not None:
                self._on_credential(payload)
        # PONG: last_seen is all it is for

    def close(self, reason: str) -> None:
        """The connection is gone: every stream fails with :class:`TunnelClosed`."""
        if self._error is not None:
            return
        self._error = TunnelClosed(reason)
        streams = list(self.streams.values())
        self.streams.clear()
        for stream in streams:
            stream.fail(self._error)
