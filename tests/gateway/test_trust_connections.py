"""Connection hygiene on a real coordinator process: per-address and total caps, the header
deadline (slowloris), the header size limit; nobody else is starved by one address's flood."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

pytestmark = pytest.mark.slow

CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


@contextlib.contextmanager
def sockets(port: int, n: int, source: str = "127.0.0.1") -> Iterator[list[socket.socket]]:
    opened: list[socket.socket] = []
    try:
        for _ in range(n):
            opened.append(socket.create_connection(("127.0.0.1", port), source_address=(source, 0)))
        yield opened
    finally:
        for s in opened:
            s.close()


def answer_of(s: socket.socket, timeout: float = 10.0) -> bytes:
    s.settimeout(timeout)
    try:
        return s.recv(4096)
    except ConnectionResetError:
        return b""


def from_other_address(**kw: Any) -> httpx.Client:
    """A client whose connections come from 127.0.0.2 (another loopback address)."""
    return httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.0.2"), **kw)


def test_a_flood_from_one_address_does_not_starve_another(pool_factory: Any, backends: Any) -> None:
    cap = 20
    pool = pool_factory(
        env={"RMA_MAX_CONNECTIONS_PER_ADDRESS": str(cap), "RMA_HEADER_TIMEOUT": "30"}
    )
    pool.add_worker("w", {"fake": backends("a").url})
    port = port_of(pool.url)
    stop = threading.Event()
    with sockets(port, 3 * cap) as flood:
        slow = flood[: cap // 2]  # slowloris: headers a byte at a time, never finished

        def dribble() -> None:
            for s in slow:
                with contextlib.suppress(OSError):
                    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-A: ")
            while not stop.wait(0.2):
                for s in slow:
                    with contextlib.suppress(OSError):
                        s.sendall(b"a")

        t = threading.Thread(target=dribble)
        t.start()
        try:
            # past the cap, the flooding address gets a fast 503 and a closed socket
            refused = [answer_of(s) for s in flood[cap:]]
            assert all(r.startswith(b"HTTP/1.1 503") for r in refused), refused[:3]
            assert b'"saturated"' in refused[0]
            # another address is served meanwhile, within the client's deadline
            headers = {"authorization": f"Bearer {pool.api_key}"}
            with from_other_address(base_url=pool.url, timeout=5, headers=headers) as other:
                for _ in range(3):
                    r = other.post("/v1/chat/completions", json=CHAT)
                    assert r.status_code == 200, r.text
                assert other.get("/readyz").status_code == 200  # not saturated in total
        finally:
            stop.set()
            t.join(10)


def test_slow_headers_get_408_and_big_headers_431(pool_factory: Any) -> None:
    pool = pool_factory(env={"RMA_HEADER_TIMEOUT": "1", "RMA_MAX_HEADER_BYTES": "8192"})
    port = port_of(pool.url)
    with sockets(port, 2) as (idle, slow):
        slow.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: a")
        for s in (idle, slow):
            assert answer_of(s).startswith(b"HTTP/1.1 408"), "the deadline did not close it"
    with httpx.Client(base_url=pool.url, timeout=10) as c:
        r = c.get("/healthz", headers={"x-big": "a" * 20_000})
        assert r.status_code == 431
        assert r.json()["error"]["code"] == "headers_too_large"
        assert c.get("/healthz", headers={"x-fine": "a" * 4000}).status_code == 200
        # a keep-alive connection serves one request after another (the deadline is per request)
        for _ in range(3):
            assert c.get("/healthz").status_code == 200


def test_a_request_the_parser_cannot_read_gets_a_json_400(pool_factory: Any) -> None:
    """Bad framing (schemathesis found it: `transfer-encoding: Bz1LQ^`) is answered like every
    other error, `{"error": ...}` JSON, not the HTTP server's plain text."""
    pool = pool_factory()
    with sockets(port_of(pool.url), 1) as (s,):
        s.sendall(
            b"DELETE /api/services/x/y HTTP/1.1\r\nHost: x\r\ntransfer-encoding: Bz1LQ^\r\n\r\n"
        )
        raw = answer_of(s)
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400")
    assert b"content-type: application/json" in head.lower()
    assert json.loads(body)["error"]["code"] == "bad_request"


def test_readyz_turns_503_at_the_total_cap(pool_factory: Any) -> None:
    total = 30
    pool = pool_factory(
        env={
            "RMA_MAX_CONNECTIONS": str(total),
            "RMA_MAX_CONNECTIONS_PER_ADDRESS": "0",
            "RMA_HEADER_TIMEOUT": "60",
        }
    )
    port = port_of(pool.url)
    with from_other_address(base_url=pool.url, timeout=10) as other:
        assert other.get("/readyz").status_code == 200
    with sockets(port, total - 1):
        # the last connection the cap allows: /readyz says why it is not ready
        with from_other_address(base_url=pool.url, timeout=10) as other:
            r = other.get("/readyz")
        assert r.status_code == 503
        assert r.json()["error"]["code"] == "saturated"
        assert "max_connections=30" in r.json()["error"]["message"]
        with sockets(port, 1) as (last,):
            # past the cap: a fast 503 before any parsing, from any address
            with from_other_address(base_url=pool.url, timeout=10) as other:
                r = other.get("/readyz")
            assert r.status_code == 503
            assert r.json()["error"]["code"] == "saturated"
            del last
    # the flood gone, ready again
    with from_other_address(base_url=pool.url, timeout=10) as other:
        deadline = time.monotonic() + 10
        while other.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, "/readyz did not come back"
            time.sleep(0.05)
