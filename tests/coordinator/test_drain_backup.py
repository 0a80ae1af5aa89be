"""An operator's drain of a data service's holder: a fresh backup first, then the hand-over.

The real coordinator app in-process (FakeClock); the workers are this test registering,
heartbeating and uploading backups over HTTP, as agents do.  The agent's side (it backs up when
its heartbeat answer asks) runs for real in ``tests/gateway/test_data_durability.py``.
"""

from __future__ import annotations

from typing import Any

from tests.coordinator.conftest import DATA_CAPS, Api, Registered

from rma.coordinator.clock import FakeClock


def healthy(*services: str) -> list[dict[str, Any]]:
    return [{"name": s, "state": "running", "healthy": True} for s in services]


def names(answer: dict[str, Any]) -> list[str]:
    return sorted(s["name"] for s in answer["assignments"])


def two_holders(api: Api) -> tuple[Registered, Registered]:
    """``a`` holds postgres healthy; ``b`` could (both offer only postgres)."""
    a = api.register("a", DATA_CAPS, runnable=["postgres"])
    assert [s["name"] for s in a.body["assignments"]] == ["postgres"]
    api.heartbeat(a, services=healthy("postgres"))
    b = api.register("b", DATA_CAPS, runnable=["postgres"])
    assert names(api.heartbeat(b, services=[])) == []
    return a, b


def upload(api: Api, worker: Registered, body: bytes) -> None:
    r = api.client.put("/api/worker/backups/postgres", content=body, headers=worker.headers)
    assert r.status_code == 201, r.text


def test_a_drain_waits_for_the_holders_fresh_backup(api: Api) -> None:
    a, b = two_holders(api)
    upload(api, a, b"-- periodic\n")
    r = api.client.post(f"/api/admin/workers/{a.id}/drain", headers=api.admin)
    assert r.status_code == 200, r.text
    asked = api.events("backup_requested")
    assert [e["data"]["service"] for e in asked] == ["postgres"]
    answer = api.heartbeat(a, services=healthy("postgres"), draining=False)
    assert answer["backup"] == ["postgres"]  # asked again until it is in
    assert names(answer) == ["postgres"]  # a keeps serving meanwhile
    assert names(api.heartbeat(b, services=[])) == []  # nothing placed from the old backup
    upload(api, a, b"-- fresh, after the drain\n")
    assert names(api.heartbeat(b, services=[])) == ["postgres"]
    assert api.heartbeat(a, services=healthy("postgres"))["backup"] == []
    newest = api.client.get("/api/worker/backups/postgres", headers=b.headers)
    assert newest.status_code == 200 and newest.content == b"-- fresh, after the drain\n"


def test_the_wait_is_bounded(api: Api, clock: FakeClock) -> None:
    a, b = two_holders(api)
    assert api.client.post(f"/api/admin/workers/{a.id}/drain", headers=api.admin).status_code == 200
    assert names(api.heartbeat(b, services=[])) == []
    clock.advance(api.pool.settings.handover_backup_timeout + 1)
    api.heartbeat(a, services=healthy("postgres"))  # still draining, never backed up
    api.pool.scheduler.run("periodic")  # the next pass places it, from the newest backup
    assert names(api.heartbeat(b, services=[])) == ["postgres"]
    assert api.heartbeat(a, services=healthy("postgres"))["backup"] == []


def test_an_undrain_ends_the_wait(api: Api) -> None:
    a, b = two_holders(api)
    assert api.client.post(f"/api/admin/workers/{a.id}/drain", headers=api.admin).status_code == 200
    assert (
        api.client.post(f"/api/admin/workers/{a.id}/undrain", headers=api.admin).status_code == 200
    )
    answer = api.heartbeat(a, services=healthy("postgres"))
    assert answer["backup"] == [] and names(answer) == ["postgres"]
