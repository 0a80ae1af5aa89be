"""The tunnel's wire format: one binary WebSocket message per frame.

::

    +--------+--------+----------------------+------------------+
    | type 1 | flags 1| stream id 4 (big end)| payload ...      |
    +--------+--------+----------------------+------------------+

Six bytes of header, then the payload.  Frame types:

``OPEN``   coordinator -> worker: a new request; payload is a 4-byte length, JSON ``{service,
           method, path, headers}``, then the first body bytes (counted against the credit).
           ``FIN`` set: that was all of the body.  A small request is one frame.
``HEAD``   worker -> coordinator: the response head; same layout, JSON ``{status, headers}``.
           ``FIN`` set: no more body.
``DATA``   body bytes, either way.  ``FIN`` set: the last ones in that direction.
``RESET``  either way: the stream is aborted; JSON ``{code, message}``.  The coordinator sends
           it when the client went away (the worker cancels the upstream request); the worker
           when the service failed (``code`` says how).
``WINDOW`` either way: 4-byte credit increment for the stream's DATA (flow control).
``PING``   / ``PONG`` (stream 0): application keepalive, payload echoed.
``CREDENTIAL`` worker -> coordinator (stream 0, protocol 2): the worker's renewed credential
           (UTF-8).  The coordinator checks it and keeps the tunnel past the old one's expiry;
           a tunnel whose credential expires is closed (code 1008), and the agent reconnects.

Flow control: each direction of each stream starts with :data:`INITIAL_WINDOW` bytes of credit;
a sender never has more DATA payload in flight than its credit, and the receiver grants more
(``WINDOW``) as its consumer reads.  A slow consumer stalls only its own stream.
"""

from __future__ import annotations

import json
import struct
from enum import IntEnum
from typing import Any

#: The WebSocket subprotocol; bump on incompatible changes.  ``.2`` added ``CREDENTIAL``.
SUBPROTOCOL = "rma-tunnel.2"
#: Older versions still understood (first = preferred); ``.1`` agents never send ``CREDENTIAL``.
SUBPROTOCOLS = (SUBPROTOCOL, "rma-tunnel.1")
#: Path of the coordinator's WebSocket route.
TUNNEL_PATH = "/api/worker/tunnel"

HEADER = struct.Struct("!BBI")
HEADER_SIZE = HEADER.size
WINDOW_INCREMENT = struct.Struct("!I")

#: Credit each direction of a stream starts with.
INITIAL_WINDOW = 256 * 1024
#: Largest DATA payload in one frame: bounds how long one stream holds the socket.
MAX_DATA = 64 * 1024
#: Largest frame either side accepts (heads with large headers included).
MAX_FRAME = 1024 * 1024

FIN = 0x01


class FrameType(IntEnum):
    OPEN = 1
    HEAD = 2
    DATA = 3
    RESET = 4
    WINDOW = 5
    PING = 6
    PONG = 7
    CREDENTIAL = 8


class ProtocolError(Exception):
    """The peer sent something this protocol does not allow; the tunnel is closed."""


def encode(kind: FrameType, stream_id: int, payload: bytes = b"", flags: int = 0) -> bytes:
    return HEADER.pack(kind, flags, stream_id) + payload


def decode(data: bytes) -> tuple[FrameType, int, int, bytes]:
    """``(type, flags, stream_id, payload)`` of one frame."""
    if len(data) < HEADER_SIZE:
        raise ProtocolError(f"frame of {len(data)} bytes is shorter than its header")
    kind, flags, stream_id = HEADER.unpack_from(data)
    try:
        ftype = FrameType(kind)
    except ValueError:
        raise ProtocolError(f"unknown frame type {kind}") from None
    return ftype, flags, stream_id, data[HEADER_SIZE:]


def encode_head(head: dict[str, Any], body: bytes = b"") -> bytes:
    """An OPEN/HEAD payload: length-prefixed JSON head, then inline body bytes."""
    data = encode_json(head)
    return WINDOW_INCREMENT.pack(len(data)) + data + body


def decode_head(payload: bytes) -> tuple[dict[str, Any], bytes]:
    if len(payload) < WINDOW_INCREMENT.size:
        raise ProtocolError("head frame too short")
    (n,) = WINDOW_INCREMENT.unpack_from(payload)
    end = WINDOW_INCREMENT.size + n
    if end > len(payload):
        raise ProtocolError("head frame shorter than its JSON length")
    return decode_json(payload[WINDOW_INCREMENT.size : end]), payload[end:]


def encode_json(value: dict[str, Any]) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def decode_json(payload: bytes) -> dict[str, Any]:
    try:
        value = json.loads(payload)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"bad JSON in frame: {exc}") from None
    if not isinstance(value, dict):
        raise ProtocolError("frame JSON is not an object")
    return value


def headers_from_json(value: Any) -> list[tuple[str, str]]:
    if not isinstance(value, list):
        raise ProtocolError("headers must be a list of [name, value] pairs")
    out: list[tuple[str, str]] = []
    for item in value:
        if not (
            isinstance(item, list) and len(item) == 2 and all(isinstance(x, str) for x in item)
        ):
            raise ProtocolError("headers must be a list of [name, value] pairs")
        out.append((item[0], item[1]))
    return out


#: Hop-by-hop headers: meaningful for one connection only, never forwarded through the tunnel.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)


def end_to_end(
    headers: list[tuple[str, str]], *, drop: frozenset[str] = frozenset()
) -> list[tuple[str, str]]:
    """``headers`` without hop-by-hop ones (and without ``drop``), names lower-cased."""
    out = []
    for name, value in headers:
        low = name.lower()
        if low in HOP_BY_HOP or low in drop:
            continue
        out.append((low, value))
    return out
