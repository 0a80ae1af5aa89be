"""Reconcile: the desired placement of every service, diffed against the current one.

:func:`plan` is pure: catalog, workers and demand in, a :class:`Plan` out.  Changes are minimal:
a placement that is still feasible and still wanted is kept, and every change carries the reason
that an ``assigned`` / ``unassigned`` event names.

The rules, in order:

1. A worker that is offline, left or removed holds nothing (its replicas are replaced now).
2. Kept: what a live worker already runs, while it still fits and the service still wants that
   many copies; what a draining worker runs, until the hand-over below.
3. Added: services in rank order (``priority``, then the shortest of its wanted count, then the
   biggest), each on the best candidate workers (:mod:`.rank`) until it has its wanted count.
4. Wanted: ``replicas`` (the minimum), raised by demand, capped by ``max_replicas``; with
   ``replicas = 0`` every live worker of its own tier that fits, or one worker of a better tier
   when its own tier has none (that stand-in lets go once its own tier runs it healthy).
5. A draining worker lets go of a service once the live replicas placed elsewhere are all
   healthy (the hand-over), or ``drain_timeout`` seconds after it started draining; an agent
   draining itself (it is stopping) at once when no other worker can take the service.
6. Held: a service in ``hold`` gets no new placement (its draining holder keeps it meanwhile).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from rma.coordinator.scheduler.feasible import Node, Room, fits
from rma.coordinator.scheduler.rank import node_order, service_order
from rma.schemas.api import ServiceSpec


@dataclass(frozen=True, slots=True)
class Placement:
    service: str
    gpus: tuple[int, ...] = ()
    #: Share of its GPU's memory (vLLM's ``--gpu-memory-utilization``), for GPU services.
    gpu_share: float | None = None


@dataclass(frozen=True, slots=True)
class Change:
    kind: str  # "assigned" | "unassigned"
    worker_id: str
    worker: str
    service: str
    reason: str


@dataclass(slots=True)
class Plan:
    #: worker id -> service name -> placement (every node given to :func:`plan` has an entry).
    placements: dict[str, dict[str, Placement]] = field(default_factory=dict)
    #: service name -> how many copies the pool wants now.
    wanted: dict[str, int] = field(default_factory=dict)
    #: service name -> how many live workers could run it (it fits and their runtime can start
    #: it): 0 for a data service on a pool whose workers offer none.
    candidates: dict[str, int] = field(default_factory=dict)
    changes: list[Change] = field(default_factory=list)

    def assigned(self, service: str) -> int:
        return sum(1 for p in self.placements.values() if service in p)


def _wanted(spec: ServiceSpec, live: list[Node], demand: int) -> int:
    feasible = [n for n in live if fits(spec, n)]
    if spec.replicas == 0:
        own = sum(1 for n in feasible if n.tier == spec.tier)
        want = own if own else min(1, len(feasible))
    else:
        want = spec.replicas
    want = max(want, demand)
    if spec.max_replicas is not None:
        want = min(want, spec.max_replicas)
    return want


def plan(
    catalog: Mapping[str, ServiceSpec],
    nodes: list[Node],
    *,
    now: float = 0.0,
    drain_timeout: float = 300.0,
    demand: Mapping[str, int] | None = None,
    hold: frozenset[str] = frozenset(),
) -> Plan:
    """The desired placement of every catalog service on ``nodes``, and the changes to get there.

    ``hold``: services placed nowhere new in this pass (a data service waiting for its draining
    holder's fresh backup, :mod:`rma.coordinator.handover`)."""
    out = Plan(placements={n.id: {} for n in nodes})
    rooms = {n.id: Room(n.caps) for n in nodes}
    live = [n for n in nodes if n.live]
    draining = [n for n in nodes if n.draining]

    def drop(node: Node, service: str, reason: str) -> None:
        out.changes.append(Change("unassigned", node.id, node.name, service, reason))

    def put(node: Node, spec: ServiceSpec, gpus: tuple[int, ...]) -> None:
        share = rooms[node.id].share(spec, gpus)
        out.placements[node.id][spec.name] = Placement(spec.name, gpus, share)

    # 1. workers that are gone hold nothing
    for node in nodes:
        if node.live or node.draining:
            continue
        for service in sorted(node.current):
            drop(node, service, f"worker {node.name} is {node.status.value}")

    for spec in catalog.values():
        out.wanted[spec.name] = _wanted(spec, live, (demand or {}).get(spec.name, 0))
        out.candidates[spec.name] = sum(1 for n in live if fits(spec, n))

    # 2. keep what still fits and is still wanted (draining workers first keep everything)
    for node in draining:
        for service in sorted(node.current):
            held = catalog.get(service)
            if held is None:
                drop(node, service, f"{service} is no longer in the catalog")
                continue
            gpus = rooms[node.id].take(held, node.current[service])
            put(node, held, gpus if gpus is not None else node.current[service])
    kept: dict[str, int] = {}
    ranked = sorted(catalog.values(), key=lambda s: service_order(s, 0))
    for node in live:
        for service in sorted(node.current):
            if service not in catalog:
                drop(node, service, f"{service} is no longer in the catalog")
    for spec in ranked:
        holders = [n for n in live if spec.name in n.current]
        holders.sort(key=lambda n: node_order(spec, n, rooms[n.id]))
        want = out.wanted[spec.name]
        own_tier = any(n.tier == spec.tier and fits(spec, n) for n in live)
        for node in holders:
            if not fits(spec, node):
                drop(node, spec.name, f"{spec.name} no longer fits on worker {node.name}")
                continue
            stand_in = spec.replicas == 0 and node.tier != spec.tier and own_tier
            if kept.get(spec.name, 0) >= want and not stand_in:
                drop(node, spec.name, f"{spec.name} has more replicas than the {want} wanted")
                continue
            gpus = rooms[node.id].take(spec, node.current[spec.name])
            if gpus is None:
                drop(node, spec.name, f"{spec.name} no longer fits on worker {node.name}")
                continue
            put(node, spec, gpus)
            if stand_in:
                continue  # a stand-in: not counted against its own tier's workers (see below)
            kept[spec.name] = kept.get(spec.name, 0) + 1

    # 3. add, in rank order, where it fits best
    short = {s.name: out.wanted[s.name] - kept.get(s.name, 0) for s in catalog.values()}
    for spec in sorted(catalog.values(), key=lambda s: service_order(s, short[s.name])):
        want = out.wanted[spec.name]
        have = kept.get(spec.name, 0)
        if have >= want or spec.name in hold:
            continue
        candidates = [
            n
            for n in live
            if spec.name not in out.placements[n.id]
            and spec.name not in n.current
            and fits(spec, n)
        ]
        candidates.sort(key=lambda n: node_order(spec, n, rooms[n.id]))
        for node in candidates:
            if have >= want:
                break
            gpus = rooms[node.id].take(spec)
            if gpus is None:
                continue
            put(node, spec, gpus)
            out.changes.append(
                Change(
                    "assigned",
                    node.id,
                    node.name,
                    spec.name,
                    f"{spec.name} had {have} of {want} wanted replicas",
                )
            )
            have += 1
        kept[spec.name] = have

    # replicas = 0: a worker of a better tier stands in until its own tier runs it healthy
    for spec in catalog.values():
        if spec.replicas != 0:
            continue
        own = [n for n in live if n.tier == spec.tier and spec.name in out.placements[n.id]]
        if not own:
            continue
        stand_ins = [n for n in live if n.tier != spec.tier and spec.name in out.placements[n.id]]
        for node in stand_ins:
            if spec.name not in node.current:  # placed in this pass: not needed after all
                del out.placements[node.id][spec.name]
                out.changes = [
                    c
                    for c in out.changes
                    if not (
                        c.kind == "assigned" and c.worker_id == node.id and c.service == spec.name
                    )
                ]
            elif any(spec.name in n.healthy for n in own):
                del out.placements[node.id][spec.name]
                drop(node, spec.name, f"workers of tier {spec.tier} run {spec.name} now")

    # 5. the hand-over: a draining worker lets go once the replacements are healthy
    for node in draining:
        for service in list(out.placements[node.id]):
            elsewhere = [n for n in live if service in out.placements[n.id]]
            healthy = [n for n in elsewhere if service in n.healthy]
            if elsewhere and len(healthy) == len(elsewhere):
                names = ", ".join(n.name for n in healthy)
                reason = f"worker {node.name} is draining; handed over to {names}"
            elif not elsewhere and not node.drained:
                # the agent's own drain (it is stopping): with nowhere else to go, nothing to
                # wait for; an operator's drain waits (a worker may join meanwhile)
                reason = f"worker {node.name} is draining; no other worker can take it"
            elif now - node.since >= drain_timeout:
                reason = f"worker {node.name} is draining; hand-over timed out"
            else:
                continue
            del out.placements[node.id][service]
            drop(node, service, reason)
    return out
