"""Ranking: which service is placed first, and which worker a service goes to first."""

from __future__ import annotations

from rma.coordinator.scheduler.feasible import Node, Room
from rma.schemas.api import ServiceSpec


def service_order(spec: ServiceSpec, short: int) -> tuple[int, int, int, int, str]:
    """Sort key: higher ``priority`` first, then the service shortest of its wanted replicas,
    then the bigger one (first fit decreasing: a big model is placed before small ones fill the
    GPU), then the name."""
    res = spec.resources
    return (-spec.priority, -short, -res.vram_mb, -res.memory_mb, spec.name)


def node_order(spec: ServiceSpec, node: Node, room: Room) -> tuple[bool, bool, float, str, str]:
    """Sort key of a candidate worker: one that holds it already, then one of the service's own
    tier (a GPU worker is not spent on CPU services while service workers exist), then the one
    with the most RAM left, then by name."""
    return (
        spec.name not in node.current,
        node.tier != spec.tier,
        -room.memory_mb,
        node.name,
        node.id,
    )
