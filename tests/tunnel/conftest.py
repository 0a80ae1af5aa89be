"""Real parts for tunnel tests: a coordinator app and a small HTTP backend on loopback ports.

Both run under uvicorn inside the test's event loop (so a test can call ``hub.open`` directly and
look at the hub's state); the worker side is the real :class:`TunnelClient` over a real
WebSocket.  The backend is a raw ASGI app whose routes make the tunnel's hard cases easy to
produce: echo, SSE paced by the test, a large body, a request that never answers, and a record
of every request the client abandoned (disconnects).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import httpx
import pytest
import uvicorn

from rma.agent.backoff import Backoff
from rma.agent.tunnel import TunnelClient
from rma.coordinator.app import create_app
from rma.coordinator.gateway.upstream import UpstreamRequest
from rma.coordinator.tunnel_hub import TunnelHub, mount_tunnel
from rma.settings import CoordinatorSettings


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


SERVICE_CAPS: dict[str, Any] = {"cpu_cores": 4, "memory_mb": 8192, "disk_free_mb": 50_000}

Scope = dict[str, Any]


@dataclass
class Backend:
    """What the backend saw; ``gates[name]`` paces ``/sse?gate=name`` one event per ``set``."""

    url: str = ""
    disconnects: list[str] = field(default_factory=list)
    started: list[str] = field(default_factory=list)
    gates: dict[str, asyncio.Queue[None]] = field(default_factory=dict)
    disconnected: asyncio.Event = field(default_factory=asyncio.Event)

    def gate(self, name: str) -> asyncio.Queue[None]:
        return self.gates.setdefault(name, asyncio.Queue())

    async def app(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        path = scope["path"]
        query = {k: v[0] for k, v in parse_qs(scope["query_string"].decode()).items()}
        tag = query.get("tag", path)
        self.started.append(tag)
        try:
            await self._route(path, query, scope, receive, send)
        except asyncio.CancelledError:
            self._lost(tag)
            raise
        except OSError:
            self._lost(tag)

    def _lost(self, tag: str) -> None:
        self.disconnects.append(tag)
        self.disconnected.set()

    async def _route(
        self, path: str, query: dict[str, str], scope: Scope, receive: Any, send: Any
    ) -> None:
        if path == "/health":
            await _answer(send, 200, b"ok")
        elif path == "/echo":
            body = b""
            while True:
                msg = await receive()
                body += msg.get("body", b"")
                if not msg.get("more_body"):
                    break
            info = {
                "method": scope["method"],
                "path": scope["path"],
                "query": scope["query_string"].decode(),
                "headers": {k.decode(): v.decode() for k, v in scope["headers"]},
                "length": len(body),
                "sha256": hashlib.sha256(body).hexdigest(),
            }
            if query.get("raw"):
                await _answer(send, 200, body, "application/octet-stream")
            else:
                await _answer(send, 200, json.dumps(info).encode(), "application/json")
        elif path == "/status":
            await _answer(send, int(query["code"]), b"status")
        elif path == "/big":
            size = int(query["size"])
            await send(_start(200, "application/octet-stream", [(b"content-length", str(size))]))
            chunk = bytes(range(256)) * 256  # 64 KiB
            sent = 0
            while sent < size:
                part = chunk[: min(len(chunk), size - sent)]
                sent += len(part)
                await send({"type": "http.response.body", "body": part, "more_body": sent < size})
        elif path == "/sse":
            await self._sse(query, receive, send)
        elif path == "/hang":  # headers never come; wait for the client to go away
            while (await receive())["type"] != "http.disconnect":
                pass
            self._lost(query.get("tag", path))
        else:
            await _answer(send, 404, b"no such route")

    async def _sse(self, query: dict[str, str], receive: Any, send: Any) -> None:
        n = int(query.get("n", "5"))
        delay = float(query.get("delay", "0"))
        gate = self.gate(query["gate"]) if "gate" in query else None
        tag = query.get("tag", "sse")
        await send(_start(200, "text/event-stream", [(b"cache-control", b"no-cache")]))
        for i in range(n):
            if gate is not None:
                await gate.get()
            elif delay:
                await asyncio.sleep(delay)
            event = f"data: {json.dumps({'tag': tag, 'i': i})}\n\n".encode()
            await send({"type": "http.response.body", "body": event, "more_body": True})
        if query.get("forever"):
            while (await receive())["type"] != "http.disconnect":
                pass
            self._lost(tag)
            return
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})


def _start(status: int, ctype: str, extra: list[tuple[bytes, Any]] | None = None) -> dict[str, Any]:
    headers = [(b"content-type", ctype.encode())]
    headers += [(k, v.encode() if isinstance(v, str) else v) for k, v in extra or []]
    return {"type": "http.response.start", "status": status, "headers": headers}


async def _answer(send: Any, status: int, body: bytes, ctype: str = "text/plain") -> None:
    await send(_start(status, ctype, [(b"content-length", str(len(body)))]))
    await send({"type": "http.response.body", "body": body})


@contextlib.asynccontextmanager
async def serving(app: Any, port: int, host: str = "127.0.0.1") -> AsyncIterator[uvicorn.Server]:
    """``app`` under uvicorn in this event loop until the block ends."""
    config = uvicorn.Config(
        app, host=host, port=port, log_level="warning", lifespan="on", interface="asgi3"
    )
    server = uvicorn.Server(config)
    server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
            raise RuntimeError("uvicorn stopped while starting")
        await asyncio.sleep(0.01)
    try:
        yield server
    finally:
        server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, 15)


@pytest.fixture
async def backend() -> AsyncIterator[Backend]:
    b = Backend()
    port = free_port()
    b.url = f"http://127.0.0.1:{port}"
    async with serving(b.app, port):
        yield b


@dataclass
class Coord:
    """The coordinator app in this loop: its hub, an admin client, worker registration."""

    url: str
    app: Any
    admin_key: str

    @property
    def hub(self) -> TunnelHub:
        hub: TunnelHub = self.app.state.tunnel_hub
        return hub

    @property
    def pool(self) -> Any:
        return self.app.state.pool

    def admin(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=self.url, headers={"authorization": f"Bearer {self.admin_key}"}, timeout=10
        )

    async def register(self, name: str = "w1") -> tuple[str, str]:
        """A new worker (transport tunnel): ``(worker_id, credential)``."""
        async with self.admin() as c:
            r = await c.post("/api/admin/tokens", json={"ttl": 600, "uses": 1, "label": "t"})
            r.raise_for_status()
            body = {
                "token": r.json()["token"],
                "name": name,
                "capabilities": SERVICE_CAPS,
                "transport": "tunnel",
            }
            r = await c.post("/api/worker/register", json=body, headers={"authorization": ""})
            assert r.status_code == 201, r.text
            data = r.json()
            return str(data["worker_id"]), str(data["credential"])

    def worker(self, worker_id: str) -> Any:
        return self.pool.registry.get(worker_id)


@contextlib.asynccontextmanager
async def running_coord(
    tmp_path: Path, database_url: str, **overrides: Any
) -> AsyncIterator[Coord]:
    """The coordinator app under uvicorn in this loop; ``overrides`` are settings."""
    options: dict[str, Any] = {"tunnel_ping_interval": 0.5, "tunnel_ping_timeout": 2.0}
    settings = CoordinatorSettings(
        data_dir=tmp_path / "data", database_url=database_url, **(options | overrides)
    )
    app = create_app(settings, run_sweeper=False)
    mount_tunnel(app)  # a no-op when the gateway already mounted it
    port = free_port()
    try:
        async with serving(app, port):
            key = (settings.data_dir / "admin.key").read_text().strip()
            yield Coord(f"http://127.0.0.1:{port}", app, key)
    finally:
        app.state.pool.engine.dispose()


@pytest.fixture
async def coord(tmp_path: Path, database_url: str) -> AsyncIterator[Coord]:
    async with running_coord(tmp_path, database_url) as c:
        yield c


@dataclass
class Worker:
    id: str
    credential: str
    client: TunnelClient
    task: asyncio.Task[None]

    async def stop(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


async def start_worker(
    coord: Coord, endpoints: dict[str, str], name: str = "w1", **kwargs: Any
) -> Worker:
    worker_id, credential = await coord.register(name)
    client = TunnelClient(
        coord.url,
        lambda: credential,
        endpoints.get,
        True,
        backoff=Backoff(base=0.05, cap=0.5, jitter=0.5),
        **kwargs,
    )
    task = asyncio.create_task(client.run())
    await wait_for(lambda: coord.hub.available(coord.worker(worker_id)), what="tunnel up")
    return Worker(worker_id, credential, client, task)


@pytest.fixture
async def worker(coord: Coord, backend: Backend) -> AsyncIterator[Worker]:
    w = await start_worker(coord, {"svc": backend.url})
    yield w
    await w.stop()


async def wait_for(cond: Any, within: float = 10.0, what: str = "condition") -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not cond():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def request(
    path: str,
    method: str = "GET",
    body: bytes = b"",
    headers: list[tuple[str, str]] | None = None,
    service: str = "svc",
) -> UpstreamRequest:
    return UpstreamRequest(
        service=service, method=method, path=path, headers=headers or [], body=body
    )
