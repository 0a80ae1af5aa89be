"""Demand-driven scaling between a service's ``replicas`` and ``max_replicas``.

:class:`Scaler` is pure bookkeeping over (time, demand) observations: no clock of its own, no
I/O.  Utilization is ``(in flight + queued) / (healthy replicas x capacity)``:

- above ``up_utilization`` for ``up_window`` seconds -> one more replica (``scaled_up``);
- below ``down_utilization`` for ``down_after`` seconds -> one fewer, never below ``replicas``
  (``scaled_down``);
- the gap between the two thresholds is the hysteresis; after a step, none for ``cooldown``
  seconds (a new replica needs time to start before its effect shows).

Only services whose catalog entry has ``max_replicas`` above ``replicas`` (and ``replicas`` of at
least 1) scale; ``replicas = 0`` already means every worker that fits.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rma.schemas.api import ServiceSpec


@dataclass(frozen=True, slots=True)
class ScaleSettings:
    up_utilization: float = 0.8
    down_utilization: float = 0.3
    up_window: float = 30.0
    down_after: float = 300.0
    cooldown: float = 60.0
    default_capacity: int = 8


@dataclass(frozen=True, slots=True)
class Demand:
    healthy: int
    inflight: int
    queued: int


@dataclass(frozen=True, slots=True)
class Step:
    service: str
    kind: str  # "scaled_up" | "scaled_down"
    wanted: int
    reason: str


@dataclass(slots=True)
class _Track:
    wanted: int
    high_since: float | None = None
    low_since: float | None = None
    last_step: float = float("-inf")


@dataclass(slots=True)
class Scaler:
    settings: ScaleSettings = field(default_factory=ScaleSettings)
    _tracks: dict[str, _Track] = field(default_factory=dict)

    @staticmethod
    def scalable(spec: ServiceSpec) -> bool:
        return (
            spec.replicas >= 1
            and spec.max_replicas is not None
            and spec.max_replicas > spec.replicas
        )

    def wanted(self) -> dict[str, int]:
        """service -> replicas demand asks for now (the scheduler's ``demand``)."""
        return {name: t.wanted for name, t in self._tracks.items()}

    def observe(self, now: float, spec: ServiceSpec, demand: Demand) -> Step | None:
        """Take one observation of a service; a step when one is due."""
        if not self.scalable(spec):
            self._tracks.pop(spec.name, None)
            return None
        assert spec.max_replicas is not None
        cfg = self.settings
        track = self._tracks.setdefault(spec.name, _Track(spec.replicas))
        track.wanted = min(max(track.wanted, spec.replicas), spec.max_replicas)
        capacity = spec.capacity or cfg.default_capacity
        load = demand.inflight + demand.queued
        utilization = load / (max(1, demand.healthy) * capacity)
        if utilization > cfg.up_utilization:
            track.high_since = now if track.high_since is None else track.high_since
            track.low_since = None
        elif utilization < cfg.down_utilization:
            track.low_since = now if track.low_since is None else track.low_since
            track.high_since = None
        else:
            track.high_since = track.low_since = None
        if now - track.last_step < cfg.cooldown:
            return None
        per = f"{load} in flight or queued on {demand.healthy} healthy x capacity {capacity}"
        if (
            track.high_since is not None
            and now - track.high_since >= cfg.up_window
            and track.wanted < spec.max_replicas
            and demand.healthy >= track.wanted  # the last step's replica is up
        ):
            track.wanted += 1
            track.last_step, track.high_since = now, None
            above = f"> {cfg.up_utilization:g} for {cfg.up_window:g} s"
            reason = f"utilization {utilization:.2f} {above} ({per})"
            return Step(spec.name, "scaled_up", track.wanted, reason)
        if (
            track.low_since is not None
            and now - track.low_since >= cfg.down_after
            and track.wanted > spec.replicas
        ):
            track.wanted -= 1
            track.last_step, track.low_since = now, None
            below = f"< {cfg.down_utilization:g} for {cfg.down_after:g} s"
            reason = f"utilization {utilization:.2f} {below} ({per})"
            return Step(spec.name, "scaled_down", track.wanted, reason)
        return None
