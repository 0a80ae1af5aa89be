"""The direct transport: plain HTTP to the service's endpoint over a pooled HTTP/1.1 client."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from rma.coordinator.gateway.h1 import H1Client, H1Error, H1Response
from rma.coordinator.gateway.upstream import UpstreamError, UpstreamRequest
from rma.coordinator.registry import WorkerState
from rma.schemas.enums import Transport


class DirectResponse:
    """An upstream answer whose headers have arrived; the body is read as it comes."""

    __slots__ = ("_resp", "headers", "status")

    def __init__(self, resp: H1Response) -> None:
        self._resp = resp
        self.status = resp.status
        self.headers = resp.headers

    async def aiter_bytes(self) -> AsyncIterator[bytes]:
        """The body byte for byte (still encoded: ``content-encoding`` is passed through)."""
        try:
            async for chunk in self._resp.aiter_bytes():
                yield chunk
        except H1Error as exc:
            raise UpstreamError(str(exc), retryable=False) from None

    async def aclose(self) -> None:
        await self._resp.aclose()


class DirectUpstream:
    """Reaches services that the worker's agent exposes on a reachable address."""

    def __init__(self, connect_timeout: float) -> None:
        self._client = H1Client(connect_timeout)

    def available(self, worker: WorkerState) -> bool:
        return worker.transport is Transport.DIRECT

    @staticmethod
    def base_url(worker: WorkerState, service: str) -> str | None:
        status = worker.services.get(service)
        endpoint = status.endpoint if status is not None else None
        return endpoint or worker.endpoint

    async def open(
        self, worker: WorkerState, request: UpstreamRequest, *, first_byte_timeout: float
    ) -> DirectResponse:
        base = self.base_url(worker, request.service)
        if not base:
            raise UpstreamError(f"worker {worker.name} reported no endpoint for {request.service}")
        return await self.send(
            base, request.method, request.path, request.headers, request.body, first_byte_timeout
        )

    async def send(
        self,
        base: str,
        method: str,
        path: str,
        headers: list[tuple[str, str]],
        body: bytes,
        first_byte_timeout: float,
    ) -> DirectResponse:
        """One request to ``base`` + ``path``; the answer once its headers arrived."""
        try:
            async with asyncio.timeout(first_byte_timeout):
                resp = await self._client.send(method, base, path, headers, body)
        except TimeoutError:
            raise UpstreamError(
                f"no response within {first_byte_timeout:g} s", timeout=True
            ) from None
        except ValueError as exc:  # a malformed endpoint URL
            raise UpstreamError(f"bad endpoint {base!r}: {exc}") from None
        except H1Error as exc:
            raise UpstreamError(
                str(exc),
                retryable=exc.before_response,
                timeout=exc.timeout,
                unreachable=exc.unreachable,
            ) from None
        return DirectResponse(resp)

    async def aclose(self) -> None:
        await self._client.aclose()
