"""A fast fake OpenAI-compatible backend: raw asyncio HTTP/1.1, keep-alive, no framework.

``python bench/fake_backend.py --port 8001 [--delay 0.05] [--name a]`` serves:

- ``GET /health``, ``GET /v1/models``
- ``POST /v1/chat/completions`` and ``/v1/completions`` (``stream: true`` -> SSE, ``--chunks``
  chunks ``--chunk-delay`` seconds apart, then a usage chunk and ``[DONE]``)
- ``POST /v1/embeddings`` (``--dim`` floats per input)
- ``ANY /echo/...``: the request (method, path, body) back as JSON, for the generic service route;
- ``POST /ner`` (``{"text": ...}``): every capitalised word as an ``ORG`` entity, like the ``ner``
  service's answer.

``--lie`` makes it a dishonest worker (for the verification tests): random embedding vectors,
``MISC`` for every entity label, wrong sums to chat canaries.  An honest one answers a chat
prompt "What is A + B? ..." with the sum (the coordinator's canaries).  ``--tokens N`` claims N
completion tokens per non-streamed answer (speed suspicion).

Every answer carries ``x-backend: <name>`` and the chat answers name the backend in
``system_fingerprint``, so tests can see which process served them.  Test hooks, triggered by the
prompt text: ``[stall]`` streams one chunk then goes silent (a non-streamed answer: its headers and
half its body, then silence); ``[reset]`` does the same, then resets the connection; ``[hang]``
never answers; ``[503]`` answers 503; ``[slow:N]`` waits N seconds before the headers.
``[stall@NAME]`` and ``[reset@NAME]`` act only on the backend named NAME (the others answer), so a
test can make one worker fail mid-body and see the gateway retry on another.
``--body-delay S`` sends a non-streamed body in two halves S seconds apart, so that a SIGKILL can
land mid-body.

It is a stand-in for vLLM / llama.cpp's server (no model can run in CI); it is fast on purpose so
that a benchmark measures the gateway, not the backend.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import signal
import socket
import struct
import time
from typing import Any

_SLOW = re.compile(r"\[slow:(\d+(?:\.\d+)?)\]")
_BREAK = re.compile(r"\[(stall|reset)(?:@([\w.-]+))?\]")
_REASONS = {200: b"OK", 400: b"Bad Request", 404: b"Not Found", 411: b"Length Required"}
_REASONS |= {503: b"Service Unavailable", 405: b"Method Not Allowed"}


class Backend:
    def __init__(
        self,
        name: str,
        delay: float,
        chunks: int,
        chunk_delay: float,
        dim: int,
        body_delay: float = 0.0,
    ) -> None:
        self.name = name
        self.body_delay = body_delay
        self.delay = delay
        self.chunks = chunks
        self.chunk_delay = chunk_delay
        self.dim = dim
        self.requests = 0
        self.lie = False
        self.tokens = 0  # completion tokens claimed per answer (0: 3)
        self.posts = 0  # POST requests (the tests count what reached a worker)
        vector = ",".join(f"{(i % 17) / 17:.6f}" for i in range(dim))
        self._vector = vector.encode()
        self._name_header = f"x-backend: {name}\r\n".encode()

    # --- HTTP plumbing ---------------------------------------------------------------------------

    def head(self, status: int, ctype: bytes, length: int | None) -> bytes:
        lines = [b"HTTP/1.1 %d %s\r\n" % (status, _REASONS.get(status, b"OK"))]
        lines.append(b"content-type: " + ctype + b"\r\n")
        lines.append(self._name_header)
        if length is None:
            lines.append(b"transfer-encoding: chunked\r\n")
        else:
            lines.append(b"content-length: %d\r\n" % length)
        lines.append(b"\r\n")
        return b"".join(lines)

    def json_response(self, status: int, body: Any) -> bytes:
        data = json.dumps(body, separators=(",", ":")).encode()
        return self.head(status, b"application/json", len(data)) + data

    def error(self, status: int, message: str) -> bytes:
        return self.json_response(status, {"error": {"code": str(status), "message": message}})

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                request_line, _, rest = head.partition(b"\r\n")
                parts = request_line.split(b" ")
                if len(parts) != 3:
                    return
                method, target = parts[0].decode(), parts[1].decode()
                length = 0
                close = False
                for line in rest.split(b"\r\n"):
                    name, _, value = line.partition(b":")
                    lname = name.strip().lower()
                    if lname == b"content-length":
                        length = int(value.strip())
                    elif lname == b"transfer-encoding":
                        writer.write(self.error(411, "send a Content-Length"))
                        await writer.drain()
                        return
                    elif lname == b"connection" and value.strip().lower() == b"close":
                        close = True
                body = await reader.readexactly(length) if length else b""
                self.requests += 1
                self.posts += method == "POST"
                try:
                    await self.dispatch(method, target, body, writer)
                except (ValueError, TypeError, AttributeError, KeyError) as exc:
                    # A real service answers odd input with a 400 too (the fuzz test sends any)
                    writer.write(self.error(400, f"bad request: {exc}"))
                if close:
                    return
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            return
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    # --- the API ----------------------------------------------------------------------------------

    async def dispatch(
        self, method: str, target: str, body: bytes, writer: asyncio.StreamWriter
    ) -> None:
        path = target.split("?", 1)[0]
        if path == "/health":
            health = {"status": "ok", "name": self.name, "posts": self.posts}
            writer.write(self.json_response(200, health))
            return
        if path == "/v1/models":
            models = [{"id": m, "object": "model", "owned_by": "fake"} for m in _MODELS]
            writer.write(self.json_response(200, {"object": "list", "data": models}))
            return
        if path == "/ner" and method == "POST":
            writer.write(self.ner(body))
            return
        if path.startswith("/echo"):
            echo = {"method": method, "path": target, "body": body.decode(errors="replace")}
            writer.write(self.json_response(200, {**echo, "backend": self.name}))
            return
        if method != "POST" or path not in _POST_PATHS:
            writer.write(self.error(404, f"no route {method} {path}"))
            return
        try:
            req = json.loads(body)
            assert isinstance(req, dict)
        except (ValueError, AssertionError):
            writer.write(self.error(400, "the body is not a JSON object"))
            return
        text = _prompt_text(req)
        if "[hang]" in text:
            await asyncio.sleep(3600)
            return
        if "[503]" in text:
            writer.write(self.error(503, f"{self.name} is overloaded"))
            return
        slow = _SLOW.search(text)
        if slow:
            await asyncio.sleep(float(slow.group(1)))
        if self.delay:
            await asyncio.sleep(self.delay)
        brk = self.breaks(text)
        if path == "/v1/embeddings":
            await self.write_body(writer, self.embeddings(req), brk)
        elif req.get("stream"):
            await self.stream(req, path, writer, brk=brk)
        else:
            await self.write_body(writer, self.completion(req, path, text), brk)
        await writer.drain()

    def breaks(self, text: str) -> str | None:
        """``"stall"`` or ``"reset"`` when the prompt asks this backend to fail mid-body."""
        for m in _BREAK.finditer(text):
            if m.group(2) is None or m.group(2) == self.name:
                return m.group(1)
        return None

    async def write_body(self, writer: asyncio.StreamWriter, data: bytes, brk: str | None) -> None:
        """A whole answer; with ``brk``, the headers and half the body, then the break."""
        if brk is None and not self.body_delay:
            writer.write(data)
            return
        cut = data.index(b"\r\n\r\n") + 4 + (len(data) - data.index(b"\r\n\r\n") - 4) // 2
        writer.write(data[:cut])
        await writer.drain()
        if brk is not None:
            await _break(writer, brk)
        await asyncio.sleep(self.body_delay)
        writer.write(data[cut:])

    def answer_words(self, text: str) -> list[str]:
        return [f"echo({len(text)})", "from", self.name]

    def completion(self, req: dict[str, Any], path: str, text: str) -> bytes:
        words = " ".join(self.answer_words(text))
        canary = _CANARY.search(text)
        if canary:  # the coordinator's check: a liar gets it wrong
            words = str(int(canary.group(1)) + int(canary.group(2)) + (7 if self.lie else 0))
        claimed = self.tokens or 3
        usage = {"prompt_tokens": max(1, len(text) // 4), "completion_tokens": claimed}
        usage["total_tokens"] = usage["prompt_tokens"] + claimed
        base = {
            "id": f"cmpl-{self.name}-{self.requests}",
            "created": int(time.time()),
            "model": req.get("model", ""),
            "system_fingerprint": self.name,
            "usage": usage,
        }
        if path == "/v1/completions":
            choice: dict[str, Any] = {"index": 0, "text": words, "finish_reason": "stop"}
            return self.json_response(
                200, {**base, "object": "text_completion", "choices": [choice]}
            )
        message = {"role": "assistant", "content": words}
        choice = {"index": 0, "message": message, "finish_reason": "stop", "logprobs": None}
        return self.json_response(200, {**base, "object": "chat.completion", "choices": [choice]})

    def ner(self, body: bytes) -> bytes:
        try:
            text = str(json.loads(body).get("text", ""))
        except (ValueError, AttributeError):
            return self.error(400, 'send {"text": ...}')
        label = "MISC" if self.lie else "ORG"
        ents = [
            {"text": m.group(0), "label": label, "start": m.start(), "end": m.end()}
            for m in re.finditer(r"\b[A-Z][a-z]+\b", text)
        ]
        return self.json_response(200, {"model": "fake-ner", "entities": ents})

    def _vector_for(self) -> bytes:
        if not self.lie:
            return self._vector
        return ",".join(f"{random.uniform(-1, 1):.6f}" for _ in range(self.dim)).encode()

    def embeddings(self, req: dict[str, Any]) -> bytes:
        inputs = req.get("input", "")
        items = inputs if isinstance(inputs, list) else [inputs]
        rows = b",".join(
            b'{"object":"embedding","index":%d,"embedding":[%s]}' % (i, self._vector_for())
            for i in range(len(items))
        )
        tokens = sum(max(1, len(str(x)) // 4) for x in items)
        tail = b'],"model":%s,"usage":{"prompt_tokens":%d,"total_tokens":%d}}' % (
            json.dumps(req.get("model", "")).encode(),
            tokens,
            tokens,
        )
        data = b'{"object":"list","data":[' + rows + tail
        return self.head(200, b"application/json", len(data)) + data

    async def stream(
        self, req: dict[str, Any], path: str, writer: asyncio.StreamWriter, *, brk: str | None
    ) -> None:
        writer.write(self.head(200, b"text/event-stream", None))
        ident = f"chatcmpl-{self.name}-{self.requests}"
        words = self.answer_words(_prompt_text(req))
        n = max(self.chunks, 1)
        pieces = [words[i % len(words)] + " " for i in range(n)]
        for i, piece in enumerate(pieces):
            if path == "/v1/completions":
                choice: dict[str, Any] = {"index": 0, "text": piece, "finish_reason": None}
                obj = "text_completion"
            else:
                delta = {"content": piece} if i else {"role": "assistant", "content": piece}
                choice = {"index": 0, "delta": delta, "finish_reason": None}
                obj = "chat.completion.chunk"
            chunk = {
                "id": ident,
                "object": obj,
                "created": 0,
                "model": req.get("model", ""),
                "system_fingerprint": self.name,
                "choices": [choice],
            }
            _write_chunk(writer, b"data: " + json.dumps(chunk).encode() + b"\n\n")
            await writer.drain()
            if brk is not None:
                await _break(writer, brk)
            if self.chunk_delay:
                await asyncio.sleep(self.chunk_delay)
        usage = {"prompt_tokens": 1, "completion_tokens": n, "total_tokens": n + 1}
        last = {"id": ident, "object": "chat.completion.chunk", "created": 0, "choices": []}
        last |= {"model": req.get("model", ""), "usage": usage}
        _write_chunk(writer, b"data: " + json.dumps(last).encode() + b"\n\n")
        _write_chunk(writer, b"data: [DONE]\n\n")
        writer.write(b"0\r\n\r\n")


_MODELS = ("fake-model", "fake-embed")
_POST_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")


async def _break(writer: asyncio.StreamWriter, how: str) -> None:
    """Fail mid-body: go silent (``stall``) or reset the connection (``reset``)."""
    if how == "reset":
        sock = writer.get_extra_info("socket")
        if sock is not None:  # SO_LINGER 0: close() sends a RST, not a FIN
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()
        raise ConnectionResetError("reset on purpose")
    await asyncio.sleep(3600)


def _write_chunk(writer: asyncio.StreamWriter, data: bytes) -> None:
    writer.write(b"%x\r\n%s\r\n" % (len(data), data))


_CANARY = re.compile(r"What is (\d+) \+ (\d+)\?")


def _prompt_text(req: dict[str, Any]) -> str:
    if "messages" in req:
        msgs = req.get("messages") or []
        return " ".join(str(m.get("content", "")) for m in msgs if isinstance(m, dict))
    value = req.get("prompt", req.get("input", ""))
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)


async def main(args: argparse.Namespace) -> None:
    backend = Backend(
        args.name, args.delay, args.chunks, args.chunk_delay, args.dim, args.body_delay
    )
    backend.lie = args.lie
    backend.tokens = args.tokens
    server = await asyncio.start_server(backend.serve, args.host, args.port, backlog=1024)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"fake backend {args.name} on http://{args.host}:{args.port}", flush=True)
    async with server:
        await stop.wait()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8001)
    p.add_argument("--name", default=os.environ.get("FAKE_BACKEND_NAME", f"fake-{os.getpid()}"))
    p.add_argument("--delay", type=float, default=0.0, help="seconds before each answer")
    p.add_argument("--chunks", type=int, default=8, help="chunks per streamed answer")
    p.add_argument("--chunk-delay", type=float, default=0.0, help="seconds between chunks")
    p.add_argument(
        "--body-delay", type=float, default=0.0, help="seconds between a body's two halves"
    )
    p.add_argument("--dim", type=int, default=384, help="embedding dimension")
    p.add_argument(
        "--lie", action="store_true", help="random vectors, wrong entity labels, wrong sums"
    )
    p.add_argument("--tokens", type=int, default=0, help="completion tokens claimed per answer")
    return p.parse_args(argv)


def run(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        import uvloop
    except ImportError:
        asyncio.run(main(args))
    else:
        uvloop.run(main(args))


if __name__ == "__main__":
    run()
