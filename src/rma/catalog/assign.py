"""Assignment: which catalog services a worker should run."""

from __future__ import annotations

from collections.abc import Collection, Mapping

from rma.schemas.api import Capabilities, ServiceSpec

#: Share of a machine's RAM the pool may plan for; the rest stays with its owner.
MEMORY_SHARE = 0.8
#: A worker label listing the only services it accepts, comma-separated.
ONLY_LABEL = "rma.services"


def fits(spec: ServiceSpec, caps: Capabilities, labels: Mapping[str, str]) -> bool:
    """Whether one service could ever run on this machine (ignoring what else it runs)."""
    if spec.gpu and not caps.gpus:
        return False
    if spec.resources.vram_mb and caps.max_vram_mb < spec.resources.vram_mb:
        return False
    if spec.resources.memory_mb > caps.memory_mb * MEMORY_SHARE:
        return False
    if any(labels.get(k) != v for k, v in spec.labels.items()):
        return False
    only = labels.get(ONLY_LABEL)
    return not (only is not None and spec.name not in {s.strip() for s in only.split(",")})


def assign(
    *,
    tier: int,
    caps: Capabilities,
    labels: Mapping[str, str],
    catalog: Mapping[str, ServiceSpec],
    replicas: Mapping[str, int],
    runnable: Collection[str] | None = None,
    current: Collection[str] = (),
) -> list[str]:
    """The services this worker should run, by name.

    ``replicas`` counts the workers already assigned each service, this one excluded.  Services of
    the worker's own tier come first, fewest replicas first; services of a lower tier (a higher
    number) are added only while they are short of replicas.  What ``current`` already holds is
    kept when it still fits, so assignments do not flap.  Everything must fit in the machine's RAM
    share and VRAM together.
    """
    memory_left = caps.memory_mb * MEMORY_SHARE
    vram_left = sum(g.memory_mb for g in caps.gpus)
    chosen: list[str] = []

    def take(spec: ServiceSpec) -> None:
        nonlocal memory_left, vram_left
        if spec.resources.memory_mb <= memory_left and spec.resources.vram_mb <= vram_left:
            memory_left -= spec.resources.memory_mb
            vram_left -= spec.resources.vram_mb
            chosen.append(spec.name)

    def eligible(spec: ServiceSpec) -> bool:
        if spec.tier < tier or not fits(spec, caps, labels):
            return False
        return runnable is None or spec.name in runnable

    def short(spec: ServiceSpec) -> bool:
        have = replicas.get(spec.name, 0)
        return have == 0 if spec.replicas == 0 else have < spec.replicas

    for name in sorted(current):
        spec = catalog.get(name)
        if spec is not None and eligible(spec):
            take(spec)
    candidates = [s for s in catalog.values() if s.name not in chosen and eligible(s)]
    candidates.sort(key=lambda s: (s.tier != tier, replicas.get(s.name, 0), s.name))
    for spec in candidates:
        own = spec.tier == tier
        if (own and (spec.replicas == 0 or short(spec))) or (not own and short(spec)):
            take(spec)
    return chosen
