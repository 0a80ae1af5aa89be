"""The dashboard's own memory: ring buffers of what each poll saw, for the load plots.

The coordinator reports counters and current values; the dashboard turns counters into rates
(``requests`` -> requests/s) by differencing consecutive polls, and keeps the last minutes.
No Textual here.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from rma.schemas.api import WorkerPublic
from rma.tui.view import inflight, queue_depths, service_health, usage_rows


@dataclass
class Ring:
    """Timestamped values, oldest first, at most ``maxlen`` of them."""

    maxlen: int = 600
    points: deque[tuple[float, float]] = field(init=False)

    def __post_init__(self) -> None:
        self.points = deque(maxlen=self.maxlen)

    def add(self, t: float, value: float) -> None:
        self.points.append((t, value))

    def trim(self, oldest: float) -> None:
        while self.points and self.points[0][0] < oldest:
            self.points.popleft()

    def values(self) -> list[float]:
        return [v for _, v in self.points]

    def times(self) -> list[float]:
        return [t for t, _ in self.points]

    @property
    def last(self) -> float | None:
        return self.points[-1][1] if self.points else None

    def __len__(self) -> int:
        return len(self.points)


class History:
    """Series by ``(group, name, metric)``, e.g. ``("service", "llm", "rps")``.

    Groups and metrics:

    - ``service``: ``rps`` (requests/s), ``eps`` (errors/s), ``p50``/``p95`` (ms), ``queued``,
      ``healthy`` (replicas);
    - ``worker`` (by worker id): ``cpu``, ``mem``, ``gpu`` (percent), ``inflight``, ``rps``;
    - ``pool`` (name ``"all"``): ``rps``, ``inflight``, ``online``.
    """

    def __init__(self, window: float = 600.0, maxlen: int = 600) -> None:
        self.window = window
        self.maxlen = maxlen
        self._series: dict[tuple[str, str, str], Ring] = {}
        self._counters: dict[tuple[str, str, str], tuple[float, float]] = {}

    # --- reading ----------------------------------------------------------------------------------

    def get(self, group: str, name: str, metric: str) -> Ring | None:
        return self._series.get((group, name, metric))

    def values(self, group: str, name: str, metric: str) -> list[float]:
        ring = self.get(group, name, metric)
        return ring.values() if ring else []

    def names(self, group: str, metric: str | None = None) -> list[str]:
        return sorted(
            {n for g, n, m in self._series if g == group and (metric is None or m == metric)}
        )

    # --- writing ----------------------------------------------------------------------------------

    def add(self, group: str, name: str, metric: str, t: float, value: float) -> None:
        key = (group, name, metric)
        ring = self._series.get(key)
        if ring is None:
            ring = self._series[key] = Ring(self.maxlen)
        ring.add(t, value)
        ring.trim(t - self.window)

    def add_rate(self, group: str, name: str, metric: str, t: float, total: float) -> None:
        """Record ``metric`` as the per-second rise of a counter since the last poll.

        The first sighting only remembers the counter; a counter that went down (the coordinator
        restarted) starts over without a point.
        """
        key = (group, name, metric)
        prev = self._counters.get(key)
        self._counters[key] = (t, total)
        if prev is None:
            return
        t0, total0 = prev
        if t <= t0 or total < total0:
            return
        self.add(group, name, metric, t, (total - total0) / (t - t0))

    def record(self, t: float, stats: Mapping[str, Any], workers: Iterable[WorkerPublic]) -> None:
        """One poll's worth: ``stats()`` and ``workers()`` seen at monotonic-ish time ``t``."""
        pool_inflight = 0
        online = 0
        for w in workers:
            n = inflight(w)
            pool_inflight += n
            if w.status.value in ("online", "draining"):
                online += 1
            if w.status.value not in ("online", "draining"):
                continue
            self.add("worker", w.id, "cpu", t, w.load.cpu_percent)
            self.add("worker", w.id, "mem", t, w.load.memory_percent)
            if w.load.gpu_percent is not None:
                self.add("worker", w.id, "gpu", t, w.load.gpu_percent)
            self.add("worker", w.id, "inflight", t, n)
        self.add("pool", "all", "inflight", t, pool_inflight)
        self.add("pool", "all", "online", t, online)

        for h in service_health(stats):
            self.add("service", h.name, "healthy", t, h.healthy)
        for name, depth in queue_depths(stats).items():
            self.add("service", name, "queued", t, depth)
        total_requests = 0.0
        seen_usage = False
        for row in usage_rows(stats, "by_service"):
            name = str(row.get("service", ""))
            if not name:
                continue
            seen_usage = True
            requests = float(row.get("requests", 0) or 0)
            total_requests += requests
            self.add_rate("service", name, "rps", t, requests)
            self.add_rate("service", name, "eps", t, float(row.get("errors", 0) or 0))
            for metric in ("p50", "p95"):
                value = row.get(f"{metric}_ms")
                if isinstance(value, int | float):
                    self.add("service", name, metric, t, float(value))
        if seen_usage:
            self.add_rate("pool", "all", "rps", t, total_requests)
        for row in usage_rows(stats, "by_worker"):
            name = str(row.get("worker_id", row.get("worker", "")))
            if name:
                self.add_rate("worker", name, "rps", t, float(row.get("requests", 0) or 0))
