"""Feasibility: may this service run on this worker at all, and does it fit in what is left?"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from rma.schemas.api import Capabilities, ServiceSpec
from rma.schemas.enums import WorkerStatus

#: Share of a machine's RAM the pool may plan for; the rest stays with its owner.
MEMORY_SHARE = 0.8
#: A worker label listing the only services it accepts, comma-separated.
ONLY_LABEL = "rma.services"


@dataclass(frozen=True, slots=True)
class Node:
    """A worker as the scheduler sees it: plain values, a snapshot of the registry."""

    id: str
    name: str
    tier: int
    caps: Capabilities
    labels: Mapping[str, str] = field(default_factory=dict)
    status: WorkerStatus = WorkerStatus.ONLINE
    drained: bool = False
    #: The catalog services its runtime can start; ``None``: every one that fits.
    runnable: frozenset[str] | None = None
    #: What it is assigned now: service name -> GPU indices (empty for CPU services).
    current: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    #: The services it reports healthy.
    healthy: frozenset[str] = frozenset()
    #: When it started draining (``status_changed_at``), for the bounded hand-over.
    since: float = 0.0

    @property
    def live(self) -> bool:
        """Takes new placements: online and not drained by the operator."""
        return self.status is WorkerStatus.ONLINE and not self.drained

    @property
    def draining(self) -> bool:
        return self.status is WorkerStatus.DRAINING or (
            self.drained and self.status is WorkerStatus.ONLINE
        )


def fits(spec: ServiceSpec, node: Node) -> bool:
    """Whether one service could ever run on this worker (ignoring what else it runs).

    Tier (a service runs on its own tier or a better one: a lower number), RAM share, CPU cores,
    VRAM of *one* GPU (never summed across GPUs), the service's required labels, the worker's
    ``rma.services`` allow-list and what its runtime can start.
    """
    caps = node.caps
    if spec.tier < node.tier:
        return False
    if node.runnable is not None and spec.name not in node.runnable:
        return False
    if (spec.gpu or spec.resources.vram_mb) and not caps.gpus:
        return False
    if spec.resources.vram_mb and caps.max_vram_mb < spec.resources.vram_mb:
        return False
    if spec.resources.memory_mb > caps.memory_mb * MEMORY_SHARE:
        return False
    if spec.resources.cpu_cores > caps.cpu_cores:
        return False
    if any(node.labels.get(k) != v for k, v in spec.labels.items()):
        return False
    only = node.labels.get(ONLY_LABEL)
    return not (only is not None and spec.name not in {s.strip() for s in only.split(",")})


class Room:
    """What is left on one worker while a plan is built: RAM share and VRAM per GPU.

    CPU cores are a feasibility check only (a service needing more cores than the machine has
    never fits); they are time-shared, not summed.
    """

    def __init__(self, caps: Capabilities) -> None:
        self.memory_mb = caps.memory_mb * MEMORY_SHARE
        self.vram_mb = [g.memory_mb for g in caps.gpus]
        self.gpu_total = [g.memory_mb for g in caps.gpus]
        self.gpu_index = [g.index if g.index is not None else i for i, g in enumerate(caps.gpus)]

    def gpu_for(self, spec: ServiceSpec, prefer: tuple[int, ...] = ()) -> int | None:
        """The position (in ``caps.gpus``) of the GPU to use, or ``None`` when none has room.

        The GPU it used before when that still has room; else the fullest one that fits (best
        fit keeps a whole GPU free for a big model).
        """
        need = spec.resources.vram_mb
        fitting = [i for i, left in enumerate(self.vram_mb) if left >= need]
        if not fitting:
            return None
        for i in fitting:
            if self.gpu_index[i] in prefer:
                return i
        return min(fitting, key=lambda i: (self.vram_mb[i], i))

    def take(self, spec: ServiceSpec, prefer: tuple[int, ...] = ()) -> tuple[int, ...] | None:
        """Charge the service to this worker; its GPU indices, or ``None`` when it does not fit."""
        res = spec.resources
        if res.memory_mb > self.memory_mb:
            return None
        gpus: tuple[int, ...] = ()
        if spec.gpu or res.vram_mb:
            i = self.gpu_for(spec, prefer)
            if i is None:
                return None
            self.vram_mb[i] -= res.vram_mb
            gpus = (self.gpu_index[i],)
        self.memory_mb -= res.memory_mb
        return gpus

    def share(self, spec: ServiceSpec, gpus: tuple[int, ...]) -> float | None:
        """The share of its GPU's memory a placed service may use (vLLM's memory utilization)."""
        if not gpus or not spec.resources.vram_mb:
            return None
        i = self.gpu_index.index(gpus[0])
        total = self.gpu_total[i]
        if total <= 0:
            return None
        return max(0.01, min(0.95, int(spec.resources.vram_mb / total * 100) / 100))
