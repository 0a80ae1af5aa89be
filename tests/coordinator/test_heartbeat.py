"""``POST /api/worker/heartbeat`` and ``/leave``: state, events, credential renewal."""

from __future__ import annotations

from typing import Any

import pytest

from rma.coordinator.clock import FakeClock

from .conftest import Api


def _svc(name: str, state: str = "running", healthy: bool = True, **kw: Any) -> dict[str, Any]:
    return {"name": name, "state": state, "healthy": healthy, **kw}


def test_heartbeat_records_load_and_services_and_answers_assignments(api: Api) -> None:
    w = api.register("alpha", runnable=["ner", "ocr"])
    body = api.heartbeat(
        w,
        load={"cpu_percent": 42.5, "memory_percent": 60},
        services=[_svc("ner", inflight=3), _svc("ocr", "starting", False)],
    )
    assert sorted(s["name"] for s in body["assignments"]) == ["ner", "ocr"]
    assert body["status"] == "online"
    assert body["credential"] is None  # still young: not renewed
    shown = api.worker(w.id)
    assert shown["load"]["cpu_percent"] == 42.5
    assert {s["name"]: (s["state"], s["healthy"], s["inflight"]) for s in shown["services"]} == {
        "ner": ("running", True, 3),
        "ocr": ("starting", False, 0),
    }
    assert api.pool.registry.get(w.id).serves("ner")
    assert not api.pool.registry.get(w.id).serves("ocr")
    messages = [e["message"] for e in api.events("service")]
    assert any("ner on alpha is healthy" in m for m in messages)
    # an unchanged report emits no new service events
    api.heartbeat(w, services=[_svc("ner", inflight=1), _svc("ocr", "starting", False)])
    assert len(api.events("service")) == len(messages)


def test_heartbeat_updates_last_heartbeat_with_the_clock(api: Api, clock: FakeClock) -> None:
    w = api.register("alpha")
    clock.advance(25)
    api.heartbeat(w)
    assert api.pool.registry.get(w.id).last_heartbeat_at == clock.now


def test_credential_is_renewed_in_heartbeats_in_its_second_half(api: Api, clock: FakeClock) -> None:
    w = api.register("alpha")
    ttl = api.pool.settings.credential_ttl
    clock.advance(ttl / 2 + 1)
    body = api.heartbeat(w)
    assert body["credential"]
    assert body["credential"] != w.credential
    assert body["credential_expires_at"]
    renewed = type(w)(w.id, body["credential"], w.secret, w.body)
    clock.advance(ttl / 2 + 1)  # the first credential has expired now, the renewed one has not
    r = api.client.post("/api/worker/heartbeat", json={}, headers=w.headers)
    assert r.status_code == 401
    assert "expired" in r.json()["error"]["message"]
    api.heartbeat(renewed)


def test_agent_draining_flag_and_admin_drain(api: Api) -> None:
    w = api.register("alpha")
    assert api.heartbeat(w, draining=True)["status"] == "draining"
    assert api.worker(w.id)["status"] == "draining"
    w2 = api.register("beta")
    r = api.client.post(f"/api/admin/workers/{w2.id}/drain", headers=api.admin)
    assert r.status_code == 200
    assert r.json()["status"] == "draining"
    # an admin drain sticks across heartbeats until undrain
    assert api.heartbeat(w2)["status"] == "draining"
    r = api.client.post(f"/api/admin/workers/{w2.id}/undrain", headers=api.admin)
    assert r.status_code == 200
    assert r.json()["status"] == "online"
    assert api.heartbeat(w2)["status"] == "online"
    r = api.client.post(f"/api/admin/workers/{w2.id}/undrain", headers=api.admin)
    assert r.status_code == 409


def test_leave_then_heartbeat_is_409_and_assignments_go(api: Api) -> None:
    w = api.register("alpha")
    assert api.client.post("/api/worker/leave", headers=w.headers).status_code == 204
    assert api.worker(w.id)["status"] == "left"
    assert api.pool.assignments_of(api.pool.registry.get(w.id)) == []
    r = api.client.post("/api/worker/heartbeat", json={}, headers=w.headers)
    assert r.status_code == 409
    assert r.json()["error"]["code"] == "left"
    assert [e["worker_id"] for e in api.events("left")] == [w.id]


def test_removed_worker_credential_is_rejected(api: Api) -> None:
    w = api.register("alpha")
    r = api.client.delete(f"/api/admin/workers/{w.id}", headers=api.admin)
    assert r.status_code == 200
    assert r.json()["status"] == "removed"
    for path in ("/api/worker/heartbeat", "/api/worker/leave"):
        r = api.client.post(path, json={}, headers=w.headers)
        assert r.status_code == 401, r.text
        assert r.json()["error"]["code"] == "removed"
    assert api.worker(w.id)["status"] == "removed"
    assert api.client.delete(f"/api/admin/workers/{w.id}", headers=api.admin).status_code == 409


def test_remove_racing_a_heartbeat_does_not_resurrect_the_worker(api: Api) -> None:
    """The heartbeat authenticated before the remove landed; it must not set it online again."""
    from rma.schemas.api import HeartbeatRequest

    w = api.register("alpha")
    state, expires = api.pool.authenticate_worker(w.credential)
    api.pool.remove(w.id)
    from rma.coordinator.errors import APIError

    with pytest.raises(APIError) as exc:
        api.pool.heartbeat(state, HeartbeatRequest(), expires)
    assert exc.value.status == 401
    assert api.worker(w.id)["status"] == "removed"


def test_one_worker_cannot_heartbeat_as_another(api: Api) -> None:
    a = api.register("a")
    b = api.register("b")
    # the body has no worker id: the credential decides who is speaking; an id field is refused
    r = api.client.post("/api/worker/heartbeat", json={"worker_id": b.id}, headers=a.headers)
    assert r.status_code == 422
    api.heartbeat(a, load={"cpu_percent": 99})
    assert api.worker(b.id)["load"]["cpu_percent"] == 0
    assert api.worker(a.id)["load"]["cpu_percent"] == 99


def test_invalid_heartbeat_changes_nothing(api: Api) -> None:
    w = api.register("alpha", runnable=["ner"])
    api.heartbeat(w, services=[_svc("ner")])
    before = api.worker(w.id)
    for bad in (
        {"load": {"cpu_percent": -1}},
        {"services": [{"name": "ner", "state": "exploded"}]},
        {"services": "ner"},
        {"surprise": True},
    ):
        r = api.client.post("/api/worker/heartbeat", json=bad, headers=w.headers)
        assert r.status_code == 422, (bad, r.text)
        assert r.json()["error"]["code"] == "invalid"
    assert api.worker(w.id) == before
