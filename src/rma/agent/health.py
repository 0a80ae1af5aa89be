"""Health probes: an HTTP GET that answers 2xx, a TCP connect (``health = "tcp"``), or a
database's own protocol (``"postgres"``: a startup message answered with an authentication
request; ``"redis"``: ``PING`` answered with ``+PONG``), which tells "accepts connections" from
"answers queries" (PostgreSQL accepts connections while it is still starting up)."""

from __future__ import annotations

import asyncio
import contextlib

import httpx


async def probe(
    http: httpx.AsyncClient, host: str, port: int, health: str, limit: float = 3.0
) -> tuple[bool, str]:
    """Whether the service answers; the second item says what was seen (for messages)."""
    if health == "tcp":
        return await probe_tcp(host, port, limit)
    if health in PROTOCOL_PROBES:
        return await probe_protocol(health, host, port, limit)
    path = health if health.startswith("/") else f"/{health}"
    url = f"http://{host}:{port}{path}"
    try:
        resp = await http.get(url, timeout=limit)
    except httpx.TimeoutException:
        return False, f"GET {path} timed out"
    except httpx.HTTPError as exc:
        return False, f"GET {path}: {type(exc).__name__}"
    if 200 <= resp.status_code < 300:
        return True, f"GET {path} -> {resp.status_code}"
    return False, f"GET {path} -> {resp.status_code}"


async def probe_tcp(host: str, port: int, limit: float = 3.0) -> tuple[bool, str]:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), limit)
    except (OSError, TimeoutError) as exc:
        return False, f"tcp {port}: {type(exc).__name__}"
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True, f"tcp {port} accepts connections"


def probe_client() -> httpx.AsyncClient:
    """The agent's one HTTP client for probes: no proxies from the environment, no keep-alive."""
    return httpx.AsyncClient(
        trust_env=False,
        verify=False,  # noqa: S501 - plain HTTP on loopback only: no CA store to load
        limits=httpx.Limits(max_keepalive_connections=0),
        follow_redirects=False,
    )


#: PostgreSQL protocol 3.0 startup message for user and database ``postgres``.
_PG_STARTUP_BODY = (196608).to_bytes(4, "big") + b"user\0postgres\0database\0postgres\0\0"
_PG_STARTUP = (len(_PG_STARTUP_BODY) + 4).to_bytes(4, "big") + _PG_STARTUP_BODY


def _postgres_answer(data: bytes) -> tuple[bool, str]:
    if data[:1] == b"R":
        return True, "postgres answers the startup message"
    if data[:1] == b"E":  # fields: a type byte, then text, NUL-terminated
        fields = {f[:1]: f[1:] for f in data[5:].split(b"\0") if f}
        text = fields.get(b"M", b"error").decode("utf-8", "replace")
        return False, f"postgres: {text}"
    return False, f"postgres: unexpected answer {data[:1]!r}"


def _redis_answer(data: bytes) -> tuple[bool, str]:
    if data.startswith((b"+PONG", b"-NOAUTH")):
        return True, "redis answers PING"
    return False, f"redis: {data.decode('utf-8', 'replace').strip()[:200] or 'no answer'}"


PROTOCOL_PROBES = {
    "postgres": (_PG_STARTUP, _postgres_answer),
    "redis": (b"PING\r\n", _redis_answer),
}


async def probe_protocol(kind: str, host: str, port: int, limit: float = 3.0) -> tuple[bool, str]:
    """Send the protocol's hello and judge the first answer."""
    hello, judge = PROTOCOL_PROBES[kind]
    writer = None
    try:
        async with asyncio.timeout(limit):
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(hello)
            await writer.drain()
            data = await reader.read(512)
    except (OSError, TimeoutError) as exc:
        return False, f"{kind} {port}: {type(exc).__name__}"
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
    if not data:
        return False, f"{kind} {port}: closed without an answer"
    return judge(data)
