"""The tunnel client counts the requests it carries per service (the heartbeat's ``inflight``)."""

from __future__ import annotations

from .conftest import Backend, Coord, Worker, request, wait_for


async def test_inflight_is_counted_per_service_while_a_request_streams(
    coord: Coord, worker: Worker, backend: Backend
) -> None:
    w = coord.worker(worker.id)
    assert worker.client.inflight_by_service() == {}
    resp = await coord.hub.open(w, request("/sse?n=1&forever=1&tag=c"), first_byte_timeout=5)
    try:
        await resp.aiter_bytes().__anext__()
        assert worker.client.inflight_by_service() == {"svc": 1}
    finally:
        await resp.aclose()
    await wait_for(lambda: worker.client.inflight_by_service() == {}, what="the count to drop")
