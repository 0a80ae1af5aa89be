"""Placement as pure functions: feasibility, ranking and the reconcile diff (no I/O, no clock)."""

from __future__ import annotations

from typing import Any

from rma.catalog import load_catalog
from rma.coordinator.scheduler import Node, fits, plan
from rma.schemas.api import Capabilities, ServiceSpec
from rma.schemas.enums import WorkerStatus


def caps(**kw: Any) -> Capabilities:
    return Capabilities.model_validate({"cpu_cores": 4, "memory_mb": 8192, **kw})


def spec(name: str, **kw: Any) -> ServiceSpec:
    return ServiceSpec.model_validate({"name": name, **kw})


def node(name: str, tier: int = 2, c: Capabilities | None = None, **kw: Any) -> Node:
    return Node(id=name, name=name, tier=tier, caps=c or caps(), **kw)


def gpus(*sizes: int, memory_mb: int = 65536) -> Capabilities:
    return caps(
        cpu_cores=16,
        memory_mb=memory_mb,
        gpus=[{"name": f"gpu{i}", "memory_mb": m} for i, m in enumerate(sizes)],
    )


def on(result: Any, worker: str) -> list[str]:
    return sorted(result.placements[worker])


CATALOG = {
    s.name: s
    for s in [
        spec("t2-everywhere", tier=2, resources={"memory_mb": 1000}),
        spec("t2-one", tier=2, replicas=1, resources={"memory_mb": 1000}),
        spec("t3-db", tier=3, replicas=1, resources={"memory_mb": 500}),
        spec("t1-gpu", tier=1, gpu=True, resources={"vram_mb": 8000}),
        spec("t2-eu", tier=2, labels={"zone": "eu"}),
    ]
}


def test_fits() -> None:
    gpu_svc = spec("g", tier=1, gpu=True, resources={"vram_mb": 8000})
    assert not fits(gpu_svc, node("a"))
    assert not fits(gpu_svc, node("a", 1, caps(gpus=[{"name": "x", "memory_mb": 6000}])))
    assert fits(gpu_svc, node("a", 1, caps(gpus=[{"name": "x", "memory_mb": 9000}])))
    # VRAM is per GPU: two of 6000 MB are not one of 12000 MB
    assert not fits(gpu_svc, node("a", 1, gpus(6000, 6000)))
    assert not fits(spec("b", resources={"memory_mb": 7000}), node("a"))  # 80 % of 8192 MB
    assert not fits(spec("c", resources={"cpu_cores": 8}), node("a"))  # 4 cores
    labelled = spec("l", labels={"zone": "eu"})
    assert fits(labelled, node("a", labels={"zone": "eu"}))
    assert not fits(labelled, node("a", labels={"zone": "us"}))
    assert not fits(spec("a"), node("a", labels={"rma.services": "b, c"}))
    assert fits(spec("c"), node("a", labels={"rma.services": "b, c"}))
    assert not fits(spec("d"), node("a", runnable=frozenset({"e"})))
    assert fits(spec("t2", tier=3), node("a", 2))  # a better tier may run it
    assert not fits(spec("t1", tier=1), node("a", 2))  # a worse one never


def test_own_tier_and_lower_tiers_while_short() -> None:
    r = plan(CATALOG, [node("a")])
    assert on(r, "a") == ["t2-everywhere", "t2-one", "t3-db"]
    assert r.wanted == {"t2-everywhere": 1, "t2-one": 1, "t3-db": 1, "t1-gpu": 0, "t2-eu": 0}
    # a second service worker: the every-worker service goes there too, the others stay put
    r = plan(
        CATALOG, [node("a", current=r.placements["a"] and {n: () for n in on(r, "a")}), node("b")]
    )
    assert on(r, "b") == ["t2-everywhere"]
    assert on(r, "a") == ["t2-everywhere", "t2-one", "t3-db"]
    assert not [c for c in r.changes if c.kind == "unassigned"]
    # a data worker never gets a tier-2 service
    assert on(plan(CATALOG, [node("d", 3, caps(cpu_cores=1, memory_mb=3000))]), "d") == ["t3-db"]


def test_labels_runnable_and_memory() -> None:
    assert "t2-eu" in on(plan(CATALOG, [node("a", labels={"zone": "eu"})]), "a")
    assert on(plan(CATALOG, [node("a", runnable=frozenset({"t2-one"}))]), "a") == ["t2-one"]
    # 80 % of 2000 MB = 1600 MB: room for one 1000 MB service and the 500 MB database
    small = on(plan(CATALOG, [node("a", c=caps(memory_mb=2000))]), "a")
    assert len([n for n in small if n.startswith("t2-")]) == 1
    assert "t3-db" in small


def test_gpu_worker_helps_out_only_while_its_tier_is_missing() -> None:
    g = node("g", 1, caps(memory_mb=32000, gpus=[{"name": "x", "memory_mb": 12000}]))
    alone = plan(CATALOG, [g])
    assert on(alone, "g") == ["t1-gpu", "t2-everywhere", "t2-one", "t3-db"]
    held = {n: alone.placements["g"][n].gpus for n in on(alone, "g")}
    g2 = node("g", 1, g.caps, current=held)
    # nothing changes while it is the only worker; another GPU worker gets only the GPU service
    again = plan(CATALOG, [g2, node("g3", 1, g.caps)])
    assert again.changes[0].service == "t1-gpu" and len(again.changes) == 1
    both = plan(CATALOG, [g2, node("s")])
    # a service worker joined: the every-worker service is its tier's...
    assert "t2-everywhere" in on(both, "s")
    assert "t2-everywhere" in on(both, "g")  # ...and the GPU worker stands in until it is healthy
    s = node("s", current={"t2-everywhere": ()}, healthy=frozenset({"t2-everywhere"}))
    both = plan(CATALOG, [g2, s])
    assert "t2-everywhere" not in on(both, "g")
    gone = [(c.service, c.reason) for c in both.changes if c.kind == "unassigned"]
    assert gone == [("t2-everywhere", "workers of tier 2 run t2-everywhere now")]
    # replica-limited ones stay where they run (no flapping)
    assert {"t2-one", "t3-db"} <= set(on(both, "g"))


def test_an_8gb_gpu_worker_gets_vllm_not_ollama() -> None:
    """16 GB RAM, one 8 GB GPU: vllm (8 GB VRAM, priority 10) is placed before ollama (6 GB)."""
    catalog = load_catalog()
    w = node("gpu", 1, gpus(8192, memory_mb=16384))
    r = plan(catalog, [w])
    assert "vllm" in on(r, "gpu")
    assert "ollama" not in on(r, "gpu")  # no VRAM left for it on the one GPU
    placed = r.placements["gpu"]["vllm"]
    assert placed.gpus == (0,)
    assert placed.gpu_share == 0.95  # the whole GPU, less vLLM's headroom


def test_two_8gb_gpus_are_not_one_16gb_gpu() -> None:
    catalog = {
        s.name: s
        for s in [spec(n, tier=1, gpu=True, resources={"vram_mb": 5000}) for n in "abc"]
        + [spec("big", tier=1, gpu=True, resources={"vram_mb": 12000})]
    }
    r = plan(catalog, [node("g", 1, gpus(8192, 8192))])
    placed = r.placements["g"]
    assert "big" not in placed  # 12 GB fits neither GPU, whatever the sum
    assert len(placed) == 2  # one 5 GB service per GPU; a third finds 3 GB left on each
    assert sorted(p.gpus for p in placed.values()) == [(0,), (1,)]
    assert {p.gpu_share for p in placed.values()} == {0.61}


def test_gpu_index_is_kept_and_best_fit_keeps_a_whole_gpu_free() -> None:
    catalog = {
        "small": spec("small", tier=1, gpu=True, resources={"vram_mb": 2000}),
        "tiny": spec("tiny", tier=1, gpu=True, resources={"vram_mb": 1000}),
    }
    w = node("g", 1, gpus(8192, 8192))
    first = plan(catalog, [w]).placements["g"]
    assert first["small"].gpus == first["tiny"].gpus  # packed on one GPU
    # what a worker runs keeps its GPU across passes
    again = plan(catalog, [node("g", 1, w.caps, current={"small": (1,), "tiny": (1,)})])
    assert again.placements["g"]["small"].gpus == (1,)
    assert again.changes == []


def test_priority_then_shortness_decides_who_gets_the_room() -> None:
    cat = {
        "a": spec("a", replicas=3, resources={"memory_mb": 3000}),
        "b": spec("b", replicas=3, resources={"memory_mb": 3000}),
    }
    holders = [node(f"h{i}", c=caps(memory_mb=4096), current={"a": ()}) for i in range(2)]
    # a has 2 of 3, b has 0 of 3: the newcomer's only 3 GB slot goes to b
    r = plan(cat, [*holders, node("new", c=caps(memory_mb=4096))])
    assert on(r, "new") == ["b"]
    # with a priority, a wins although it is less short
    cat["a"] = spec("a", replicas=3, priority=1, resources={"memory_mb": 3000})
    assert on(plan(cat, [*holders, node("new", c=caps(memory_mb=4096))]), "new") == ["a"]


def test_a_lost_holder_is_replaced_and_the_reason_named() -> None:
    cat = {"db": spec("db", tier=3, replicas=2)}
    nodes = [node("a", current={"db": ()}), node("b", current={"db": ()}), node("c")]
    assert plan(cat, nodes).changes == []
    lost = [node("a", status=WorkerStatus.OFFLINE, current={"db": ()}), *nodes[1:]]
    r = plan(cat, lost)
    assert on(r, "a") == [] and on(r, "c") == ["db"]
    assert [(c.kind, c.worker, c.reason) for c in r.changes] == [
        ("unassigned", "a", "worker a is offline"),
        ("assigned", "c", "db had 1 of 2 wanted replicas"),
    ]


def test_max_replicas_caps_and_extra_holders_go() -> None:
    cat = {"s": spec("s", replicas=1, max_replicas=2)}
    nodes = [node(n, current={"s": ()}) for n in "abc"]
    r = plan(cat, nodes, demand={"s": 5})
    assert r.wanted["s"] == 2
    assert r.assigned("s") == 2
    assert [c.kind for c in r.changes] == ["unassigned"]


def test_drain_hands_over_first_then_lets_go() -> None:
    cat = {"db": spec("db", tier=3, replicas=1)}
    draining = node("a", status=WorkerStatus.DRAINING, current={"db": ()}, since=100.0)
    r = plan(cat, [draining, node("b")], now=110.0, drain_timeout=300)
    # the replacement is placed while the draining worker still holds its copy
    assert on(r, "a") == ["db"] and on(r, "b") == ["db"]
    # b reports it healthy: a lets go
    b = node("b", current={"db": ()}, healthy=frozenset({"db"}))
    r = plan(cat, [draining, b], now=120.0, drain_timeout=300)
    assert on(r, "a") == []
    assert [c.reason for c in r.changes] == ["worker a is draining; handed over to b"]
    # never healthy: the hand-over is bounded by drain_timeout
    b_sick = node("b", current={"db": ()})
    assert on(plan(cat, [draining, b_sick], now=399.0, drain_timeout=300), "a") == ["db"]
    r = plan(cat, [draining, b_sick], now=400.0, drain_timeout=300)
    assert on(r, "a") == [] and "timed out" in r.changes[0].reason


def test_removed_from_catalog_and_no_longer_fitting() -> None:
    r = plan({}, [node("a", current={"gone": ()})])
    assert [c.reason for c in r.changes] == ["gone is no longer in the catalog"]
    cat = {"s": spec("s", resources={"memory_mb": 7000})}
    r = plan(cat, [node("a", current={"s": ()})])
    assert [c.reason for c in r.changes] == ["s no longer fits on worker a"]


def test_a_leaving_agent_with_no_possible_replacement_lets_go_at_once() -> None:
    """The agent's own drain (Ctrl-C): nothing else can take it, so nothing to wait for; an
    operator's drain still waits (a worker may join within drain_timeout)."""
    cat = {"db": spec("db", tier=3, replicas=1)}
    leaving = node("a", status=WorkerStatus.DRAINING, current={"db": ()}, since=100.0)
    r = plan(cat, [leaving], now=101.0, drain_timeout=300)
    assert on(r, "a") == []
    assert r.changes[0].reason == "worker a is draining; no other worker can take it"
    drained = node("a", status=WorkerStatus.DRAINING, drained=True, current={"db": ()}, since=100)
    assert on(plan(cat, [drained], now=101.0, drain_timeout=300), "a") == ["db"]
