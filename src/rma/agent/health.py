"""Health probes: an HTTP GET that answers 2xx, or a TCP connect (``health = "tcp"``)."""

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
