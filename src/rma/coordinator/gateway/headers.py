"""Which headers cross the gateway: allow-lists, both ways.

A worker is a stranger's machine.  It gets what a service needs to answer (content negotiation,
the OpenAI SDK's ``openai-*`` headers, request ids for tracing) and nothing that identifies or
authenticates the client: never ``Cookie``, ``Authorization``, ``X-Api-Key``, the client's
address or proxy headers (``Forwarded``, ``X-Forwarded-*``, ``X-Real-IP``), nor the gateway's own
``x-rma-*`` routing hints.  Its answer reaches the client with the headers that describe the
content only: never ``Set-Cookie`` (a worker must not plant cookies on the coordinator's origin),
``Location``, or anything else a worker could use to steer a client.

Everything not listed is dropped; the lists are the whole policy (docs/security.md).
"""

from __future__ import annotations

from collections.abc import Iterable

#: Request headers passed to workers (lower case).
REQUEST_ALLOW = frozenset(
    {
        b"accept",
        b"accept-encoding",
        b"accept-language",
        b"cache-control",
        b"content-encoding",
        b"content-language",
        b"content-type",
        b"idempotency-key",
        b"if-match",
        b"if-modified-since",
        b"if-none-match",
        b"if-unmodified-since",
        b"range",
        b"traceparent",
        b"tracestate",
        b"user-agent",
        b"x-correlation-id",
        b"x-request-id",
    }
)
#: Request header name prefixes passed to workers (``openai-organization``, ``openai-beta``...).
REQUEST_ALLOW_PREFIXES = (b"openai-",)

#: Response headers passed back to clients (lower case).
RESPONSE_ALLOW = frozenset(
    {
        b"accept-ranges",
        b"cache-control",
        b"content-disposition",
        b"content-encoding",
        b"content-language",
        b"content-length",
        b"content-range",
        b"content-type",
        b"etag",
        b"last-modified",
        b"retry-after",
        b"vary",
        b"x-request-id",
    }
)
#: Response header name prefixes passed back (``openai-model``, ``openai-processing-ms``...).
RESPONSE_ALLOW_PREFIXES = (b"openai-",)

#: Longest header value passed either way (a service needs no more; a worker sends no more).
MAX_VALUE = 8192


def _allowed(name: bytes, exact: frozenset[bytes], prefixes: tuple[bytes, ...]) -> bool:
    return name in exact or name.startswith(prefixes)


def request_headers(raw: Iterable[tuple[bytes, bytes]]) -> list[tuple[str, str]]:
    """The client's headers (ASGI: lower-case bytes) that a worker may see, as text."""
    return [
        (k.decode("latin-1"), v.decode("latin-1"))
        for k, v in raw
        if _allowed(k.lower(), REQUEST_ALLOW, REQUEST_ALLOW_PREFIXES) and len(v) <= MAX_VALUE
    ]


def response_header_allowed(name: bytes, value: bytes = b"") -> bool:
    """Whether a worker's response header (lower case) may reach the client."""
    return _allowed(name, RESPONSE_ALLOW, RESPONSE_ALLOW_PREFIXES) and len(value) <= MAX_VALUE
