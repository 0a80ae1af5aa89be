"""A worker its donor paused: heartbeats ``paused: true``; status ``paused``, no requests, its
replicas not counted, never removed for it; online again with the next plain heartbeat."""

from __future__ import annotations

from rma.coordinator.clock import FakeClock

from .conftest import Api


def test_paused_worker_is_kept_not_routed_not_counted(api: Api, clock: FakeClock) -> None:
    clock.advance(api.pool.settings.grace)
    w = api.register("laptop")
    other = api.register("server")
    services = [{"name": n, "state": "running", "healthy": True} for n in ("embeddings",)]
    api.heartbeat(w, services=services)
    state = api.pool.registry.get(w.id)
    assert state is not None
    assigned = list(state.assignments)
    assert assigned, "the worker should have been assigned something"
    name = assigned[0]
    before = api.pool.registry.replica_counts().get(name, 0)

    body = api.heartbeat(w, paused=True, pause_reason="the donor is gaming")
    assert body["status"] == "paused"
    pub = api.worker(w.id)
    assert pub["status"] == "paused" and pub["pause_reason"] == "the donor is gaming"
    assert not state.serves(name)
    assert w.id not in [x.id for x in api.pool.registry.routable(name)]
    # the scheduler places its services elsewhere: it holds none, the other worker has them
    assert not state.assignments
    held = api.pool.registry.get(other.id)
    assert held is not None and name in held.assignments
    assert api.pool.registry.replica_counts().get(name, 0) == before
    assert [x["id"] for x in api.workers(status="paused")] == [w.id]
    (event,) = api.events("paused")
    assert "gaming" in event["message"]

    # paused for far longer than remove_after, heartbeating all along: never removed
    for _ in range(12):
        clock.advance(100)
        for x in (w, other):
            body = api.heartbeat(x, paused=x is w, pause_reason="the donor is gaming")
            x.credential = body.get("credential") or x.credential
        assert api.app.state.sweeper.run_once() == {"offline": [], "removed": []}
    assert api.worker(w.id)["status"] == "paused"

    body = api.heartbeat(w, services=services)
    assert body["status"] == "online"
    assert api.worker(w.id)["pause_reason"] is None
    assert api.pool.registry.replica_counts().get(name, 0) == before


def test_a_silent_paused_worker_goes_offline_as_any_other(api: Api, clock: FakeClock) -> None:
    clock.advance(api.pool.settings.grace)
    w = api.register("laptop")
    others = [api.register(f"s{i}") for i in range(3)]
    api.heartbeat(w, paused=True, pause_reason="paused by the donor")
    clock.advance(api.pool.settings.offline_after)
    for o in others:
        api.heartbeat(o)
    assert api.app.state.sweeper.run_once()["offline"] == [w.id]


def test_pause_reason_is_bounded(api: Api) -> None:
    w = api.register("laptop")
    r = api.client.post(
        "/api/worker/heartbeat",
        json={"paused": True, "pause_reason": "x" * 201},
        headers=w.headers,
    )
    assert r.status_code == 422, r.text
    assert api.worker(w.id)["status"] == "online"
