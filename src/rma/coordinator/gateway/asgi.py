"""Small raw-ASGI helpers for the gateway's hot path (no Request/Response objects)."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.types import Receive, Scope, Send

Handler = Callable[[Scope, Receive, Send], Awaitable[None]]


class Endpoint:
    """Wraps a handler so Starlette's ``Route`` treats it as a raw ASGI app (not a function)."""

    __slots__ = ("handler",)

    def __init__(self, handler: Handler) -> None:
        self.handler = handler

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.handler(scope, receive, send)


class ClientGone(Exception):
    """The client disconnected before its request body arrived (or the body was too large)."""


async def read_body(receive: Receive) -> bytes:
    message = await receive()
    if message["type"] == "http.disconnect":
        raise ClientGone
    body: bytes = message.get("body", b"")
    if not message.get("more_body", False):
        return body
    chunks = [body]
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


def header(scope: Scope, name: bytes) -> bytes | None:
    for k, v in scope["headers"]:
        if k == name:
            return bytes(v)
    return None


async def send_json(
    send: Send, status: int, data: Any, headers: dict[str, str] | None = None
) -> None:
    body = json.dumps(data, separators=(",", ":")).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if headers:
        raw += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


async def send_error(
    send: Send, status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> None:
    await send_json(send, status, {"error": {"code": code, "message": message}}, headers)


def sse_error(code: str, message: str) -> bytes:
    """The final SSE event of a broken stream (the ``openai`` SDK raises ``APIError`` on it)."""
    payload = json.dumps({"error": {"code": code, "message": message, "type": "rma_gateway"}})
    return b"event: error\ndata: " + payload.encode() + b"\n\n"
