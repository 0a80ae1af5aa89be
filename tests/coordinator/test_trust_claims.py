"""Claims outside a worker's assignments, in-process: refused, shown, announced once."""

from __future__ import annotations

from typing import Any

from .conftest import Api, Registered


def report(api: Api, w: Registered, names: list[str]) -> dict[str, Any]:
    services = [{"name": n, "state": "running", "healthy": True} for n in names]
    return dict(api.heartbeat(w, services=services))


def test_a_claim_is_refused_shown_and_announced_once(api: Api) -> None:
    w = api.register("w")
    assigned = list(api.worker(w.id)["assignments"])
    assert assigned
    claim = next(n for n in api.pool.catalog if n not in assigned)
    for _ in range(3):
        report(api, w, [*assigned, claim])
    worker = api.worker(w.id)
    assert worker["refused"] == [claim]
    state = api.pool.registry.get(w.id)
    assert not state.serves(claim)
    assert all(state.serves(n) for n in assigned)
    assert [s["name"] for s in api.pool.stats()["services"] if s["healthy"]] == sorted(
        assigned, key=list(api.pool.catalog).index
    )
    events = api.events("claim_refused")
    assert [(e["worker_id"], e["data"]["service"]) for e in events] == [(w.id, claim)]
    # no "service ... is healthy" event for the claim either
    assert not [e for e in api.events("service") if e["data"]["service"] == claim]

    report(api, w, assigned)  # it stops claiming...
    assert api.worker(w.id)["refused"] == []
    report(api, w, [*assigned, claim])  # ...and starts again: a new event
    assert len(api.events("claim_refused")) == 2


def test_a_service_just_unassigned_gets_one_heartbeat_to_stop(api: Api) -> None:
    w = api.register("w")
    assigned = list(api.worker(w.id)["assignments"])
    gone = assigned[0]
    report(api, w, assigned)
    with api.pool.registry.lock:  # the coordinator takes it away (as a scheduler would)
        api.pool.registry.get(w.id).assignments.remove(gone)
    report(api, w, assigned)  # the agent has not stopped it yet: not a claim
    assert not api.pool.registry.get(w.id).serves(gone)
    assert api.events("claim_refused") == []
    report(api, w, assigned)  # still there a heartbeat later: a claim
    (event,) = api.events("claim_refused")
    assert event["data"]["service"] == gone
