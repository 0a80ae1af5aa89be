"""The tunnel's wire protocol, shared by the coordinator (hub) and the worker (client).

Requests from the coordinator are multiplexed as streams over one WebSocket that the worker
opened: see :mod:`rma.tunnel.frames` for the format, :mod:`rma.tunnel.stream` for one stream
with its credit windows, :mod:`rma.tunnel.mux` for the connection.  Light: no server imports.
"""

from rma.tunnel.frames import SUBPROTOCOL, TUNNEL_PATH, FrameType, ProtocolError
from rma.tunnel.mux import Mux
from rma.tunnel.stream import Stream, StreamReset, TunnelClosed

__all__ = [
    "SUBPROTOCOL",
    "TUNNEL_PATH",
    "FrameType",
    "Mux",
    "ProtocolError",
    "Stream",
    "StreamReset",
    "TunnelClosed",
]
