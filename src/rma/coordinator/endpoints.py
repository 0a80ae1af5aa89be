"""Which service endpoints the coordinator will connect to (direct transport).

A worker reports where its services listen; the gateway then sends client requests there. An
endpoint must therefore be on the machine the worker connects from, or a worker could aim the
coordinator at any host it can reach (cloud metadata, an internal admin page: SSRF). Host names
are refused too (they could resolve anywhere, and differently later), unless the operator trusts
the workers' endpoints (``trust_worker_endpoints``). Loopback endpoints are accepted only when the
coordinator itself listens on loopback alone (``local_only``): then every worker is local.
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        ip = ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def endpoint_problem(
    url: str, peer: str, *, trust: bool = False, local_only: bool = True
) -> str | None:
    """Why the coordinator must not use ``url`` for a worker connecting from ``peer``, or None."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        _ = parts.port  # a malformed port raises here
    except ValueError as exc:
        return f"not a URL: {exc}"
    if parts.scheme not in ("http", "https") or not host:
        return "not an http(s) URL"
    if parts.username or parts.password:
        return "credentials in the URL"
    if trust:
        return None
    ip, peer_ip = _ip(host), _ip(peer)
    if ip is None:
        return f"host {host!r} is a name; use the worker's IP address ({peer})"
    if peer_ip is None:
        return f"the worker's address {peer!r} is unknown"
    if ip.is_loopback or ip.is_link_local or ip.is_unspecified:
        # The coordinator's own machine: only when nothing but that machine can reach it (its
        # host is loopback, as with `rma up`); else a worker seen through a local proxy could
        # aim it at 127.0.0.1:6379.
        if local_only and ip.is_loopback and peer_ip.is_loopback:
            return None
        return f"{ip} is this coordinator's own machine or a link-local address"
    if ip == peer_ip:
        return None
    return f"{ip} is not the address the worker connects from ({peer_ip})"
