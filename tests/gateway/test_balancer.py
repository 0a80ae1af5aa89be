"""The balancer's choice on fabricated workers: capacity per service, reported load, host load,
label wishes (``x-rma-prefer`` / ``x-rma-require``)."""

from __future__ import annotations

from typing import Any

import pytest

from rma.coordinator.errors import APIError
from rma.coordinator.gateway.balancer import Balancer, Wish
from rma.coordinator.registry import Registry, WorkerState
from rma.schemas.api import Capabilities, Load, ServiceStatus
from rma.schemas.enums import ServiceState, Transport, WorkerStatus


def worker(name: str, inflight: int = 0, **load: Any) -> WorkerState:
    return WorkerState(
        id=name,
        name=name,
        status=WorkerStatus.ONLINE,
        tier=2,
        transport=Transport.TUNNEL,
        capabilities=Capabilities(cpu_cores=4, memory_mb=8192),
        labels={},
        assignments=["svc"],
        services={
            "svc": ServiceStatus(
                name="svc", state=ServiceState.RUNNING, healthy=True, inflight=inflight
            )
        },
        load=Load(**load),
    )


def balancer(*workers: WorkerState, capacity: int | None = None) -> Balancer:
    registry = Registry()
    for w in workers:
        registry.put(w)
    return Balancer(
        registry,
        capacity=8,
        queue_size=0,
        queue_timeout=1,
        cooldown_base=1,
        cooldown_max=2,
        service_capacity=lambda service: capacity,
    )


def test_capacity_comes_from_the_catalog() -> None:
    b = balancer(worker("a"), capacity=2)
    assert b.capacity_of(worker("a"), "svc") == 2
    first = b.pick("svc", set())
    assert isinstance(first, WorkerState)
    b._take(first, "svc")
    second = b.pick("svc", set())
    assert isinstance(second, WorkerState)
    b._take(second, "svc")
    assert b.pick("svc", set()) is False  # both of its 2 slots are taken
    assert balancer(worker("a")).capacity_of(worker("a"), "svc") == 8  # the default


def test_reported_inflight_counts_once_with_ours() -> None:
    # a: 2 of ours, which its heartbeat also reports; b: 3 from another coordinator
    a, b = worker("a", inflight=2), worker("b", inflight=3)
    bal = balancer(a, b, capacity=10)
    bal.inflight[("a", "svc")] = 2
    assert bal.pick("svc", set()) is a


def test_a_busy_host_gets_less() -> None:
    idle, busy = worker("idle", cpu_percent=5), worker("busy", cpu_percent=100)
    bal = balancer(busy, idle)
    picked = [bal.pick("svc", set()) for _ in range(20)]
    assert {w.name for w in picked if isinstance(w, WorkerState)} == {"idle"}


def labelled(name: str, **labels: str) -> WorkerState:
    w = worker(name)
    w.labels = dict(labels)
    return w


def test_preferred_labels_first_then_anyone() -> None:
    eu, us = labelled("eu", region="eu"), labelled("us", region="us")
    bal = balancer(eu, us, capacity=1)
    wish = Wish(prefer=(("region", "eu"),))
    first = bal.pick("svc", set(), wish=wish)
    assert isinstance(first, WorkerState) and first.name == "eu"
    bal._take(first, "svc")
    spill = bal.pick("svc", set(), wish=wish)  # the preferred one is full: anyone else
    assert isinstance(spill, WorkerState) and spill.name == "us"
    # nobody matches: any worker
    assert isinstance(bal.pick("svc", set(), wish=Wish(prefer=(("region", "ap"),))), WorkerState)


def test_required_labels_only() -> None:
    eu, us = labelled("eu", region="eu"), labelled("us", region="us")
    bal = balancer(eu, us, capacity=1)
    wish = Wish(require=(("region", "us"),))
    picked = {
        p.name
        for p in (bal.pick("svc", set(), wish=wish) for _ in range(10))
        if isinstance(p, WorkerState)
    }
    assert picked == {"us"}
    with pytest.raises(APIError) as exc:
        bal.pick("svc", set(), wish=Wish(require=(("region", "ap"),)))
    assert exc.value.status == 503 and exc.value.code == "no_matching_worker"
    with pytest.raises(APIError) as bad:
        Wish.parse("region", "x-rma-prefer")
    assert bad.value.status == 400 and "x-rma-prefer" in bad.value.message
    assert Wish.parse("region=eu, gpu=4090", "h") == (("region", "eu"), ("gpu", "4090"))


def test_a_conversation_sticks_to_one_worker_until_it_is_overloaded() -> None:
    ws = [worker(n) for n in "abcd"]
    bal = balancer(*ws, capacity=100)
    wish = Wish(affinity="model\0m:conversation-1")
    first = bal.pick("svc", set(), wish=wish)
    assert isinstance(first, WorkerState)
    for _ in range(10):  # idle pool: always the same worker for this conversation
        again = bal.pick("svc", set(), wish=wish)
        assert isinstance(again, WorkerState) and again.name == first.name
    # other conversations spread over the workers
    others = {
        p.name
        for i in range(40)
        if isinstance(p := bal.pick("svc", set(), wish=Wish(affinity=f"c{i}")), WorkerState)
    }
    assert len(others) >= 3
    # its worker is loaded well above the others: the conversation spills to the next one
    bal.inflight[(first.id, "svc")] = 5
    spilled = bal.pick("svc", set(), wish=wish)
    assert isinstance(spilled, WorkerState) and spilled.name != first.name
    # without affinity: the least loaded, whoever that is
    bal.affinity_load_factor = 0
    assert all(
        isinstance(p, WorkerState) and p.name != first.name
        for p in (bal.pick("svc", set(), wish=wish) for _ in range(10))
    )


def test_a_new_transport_lifts_cool_downs_and_the_unreachable_mark() -> None:
    a, b = worker("a"), worker("b")
    bal = balancer(a, b)
    heard: list[tuple[str, str, float]] = []
    bal.on_cool.append(lambda w, s, t: heard.append((w, s, t)))
    bal.mark_unreachable(a)
    assert bal.failed(a, "svc") == 1.0
    assert heard == [("a", "svc", 1.0)]  # told on, for the other coordinators
    assert [w.id for w in bal.workers_for("svc")] == ["b"]
    assert bal.forget("a") == 2  # its cool-down and its unreachable mark
    assert bal.cooling_now() == {}
    assert sorted(w.id for w in bal.workers_for("svc")) == ["a", "b"]
    assert bal.forget("a") == 0


def test_a_cool_down_heard_from_another_coordinator_applies_and_a_success_lifts_it() -> None:
    a, b = worker("a"), worker("b")
    bal = balancer(a, b)
    heard: list[tuple[str, str, float]] = []
    bal.on_cool.append(lambda w, s, t: heard.append((w, s, t)))
    bal.cool("a", "svc", 60.0)  # capped at cooldown_max (2 s)
    assert 0 < bal.cooling_now()[("a", "svc")] <= 2.0
    assert heard == []  # never told on
    for _ in range(20):
        assert bal.pick("svc", set()) is b
    bal.succeeded(a, "svc")  # it served here after all (all cooling): lifted, and told
    assert bal.cooling_now() == {}
    assert heard == [("a", "svc", 0.0)]
    bal.cool("b", "svc", 1.0)
    bal.cool("b", "svc", 0.0)  # lifted elsewhere
    assert bal.cooling_now() == {}


def test_split_capacity_takes_this_coordinators_share() -> None:
    a = worker("a")
    bal = balancer(a, capacity=5)
    bal.split = 2
    assert bal.capacity_of(a, "svc") == 2
    bal.split = 8
    assert bal.capacity_of(a, "svc") == 1  # never 0


def test_a_cool_down_that_crossed_the_news_of_a_new_tunnel_is_ignored() -> None:
    now = [100.0]
    bal = balancer(worker("a"), worker("b"))
    bal.clock = lambda: now[0]
    bal.forget("a")  # its tunnel attached
    bal.cool("a", "svc", 2.0)  # another coordinator's relay to the old holder failed meanwhile
    assert bal.cooling_now() == {}
    now[0] += 2.5  # past the grace: a cool-down heard now is about the new tunnel
    bal.cool("a", "svc", 2.0)
    assert bal.cooling_now() == {("a", "svc"): 2.0}
