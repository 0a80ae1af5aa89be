"""How the gateway reaches a worker's service, whatever the transport (direct HTTP or tunnel).

The gateway calls :meth:`Upstream.open`; an implementation raises :class:`UpstreamError` when the
request failed *before* any response header arrived (safe to retry elsewhere), and otherwise
returns an :class:`UpstreamResponse` whose body iterator raises :class:`UpstreamError` if the
stream breaks later (not retried: the client already has bytes).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

from rma.coordinator.registry import WorkerState


class UpstreamError(Exception):
    """The worker failed.  ``retryable`` is true when nothing reached the client yet.

    ``timeout`` marks a failure by time (connect or first-byte timeout): the gateway answers 504
    instead of 502 when every attempt failed that way.  ``unreachable`` marks a worker that
    cannot be reached at all (connection refused, tunnel gone): it leaves routing until its
    next heartbeat.
    """

    def __init__(
        self,
        message: str,
        *,
        retryable: bool = True,
        status: int | None = None,
        timeout: bool = False,
        unreachable: bool = False,
    ) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.status = status
        self.timeout = timeout
        self.unreachable = unreachable


@dataclass(slots=True)
class UpstreamRequest:
    service: str
    method: str
    path: str  # path on the service, with the query string, e.g. "/v1/chat/completions"
    headers: list[tuple[str, str]]
    body: bytes  # the gateway buffers request bodies (size-limited) so a retry can resend them


class UpstreamResponse(Protocol):
    status: int
    headers: list[tuple[str, str]]

    def aiter_bytes(self) -> AsyncIterator[bytes]: ...

    async def aclose(self) -> None: ...


class Upstream(Protocol):
    """One transport.  ``available`` says whether the worker can be reached this way right now."""

    def available(self, worker: WorkerState) -> bool: ...

    async def open(
        self, worker: WorkerState, request: UpstreamRequest, *, first_byte_timeout: float
    ) -> UpstreamResponse: ...
