"""Prometheus text-format metrics, kept in plain dicts (cheap on the request path)."""

from __future__ import annotations

import bisect
import threading
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from rma.schemas.enums import WorkerStatus

if TYPE_CHECKING:
    from rma.coordinator.pool import Pool

Labels = tuple[tuple[str, str], ...]
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


def _fmt_labels(labels: Labels) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{k}="{v}"' for k, v in labels)
    return "{" + inner + "}"


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counters: dict[str, dict[Labels, float]] = {}
        self.gauges: dict[str, Callable[[], Iterable[tuple[Labels, float]]]] = {}
        self.histograms: dict[str, dict[Labels, list[float]]] = {}
        self.help: dict[str, str] = {}

    def inc(self, name: str, labels: Labels = (), value: float = 1.0) -> None:
        with self._lock:  # called from the event loop and from worker threads
            series = self.counters.setdefault(name, {})
            series[labels] = series.get(labels, 0.0) + value

    def observe(self, name: str, seconds: float, labels: Labels = ()) -> None:
        with self._lock:
            series = self.histograms.setdefault(name, {})
            buckets = series.get(labels)
            if buckets is None:
                buckets = series[labels] = [0.0] * (len(LATENCY_BUCKETS) + 2)  # + inf, sum
            buckets[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
            buckets[-1] += seconds

    def gauge(
        self, name: str, help_text: str, fn: Callable[[], Iterable[tuple[Labels, float]]]
    ) -> None:
        self.gauges[name] = fn
        self.help[name] = help_text

    def describe(self, name: str, help_text: str) -> None:
        self.help[name] = help_text

    def render(self, pool: Pool) -> str:
        with self._lock:  # a consistent snapshot; writers may be busy in other threads
            counters = {n: dict(series) for n, series in self.counters.items()}
            histograms = {
                n: {lb: list(b) for lb, b in series.items()}
                for n, series in self.histograms.items()
            }
        out: list[str] = []
        workers: dict[str, int] = {s.value: 0 for s in WorkerStatus}
        for w in pool.registry.all():
            workers[w.status.value] += 1
        out.append("# HELP rma_workers Workers by status.\n# TYPE rma_workers gauge")
        out.extend(f'rma_workers{{status="{k}"}} {v}' for k, v in workers.items())
        for name, fn in sorted(self.gauges.items()):
            out.append(f"# HELP {name} {self.help.get(name, name)}\n# TYPE {name} gauge")
            out.extend(f"{name}{_fmt_labels(lb)} {v:g}" for lb, v in fn())
        for name, series in sorted(counters.items()):
            out.append(f"# HELP {name} {self.help.get(name, name)}\n# TYPE {name} counter")
            out.extend(f"{name}{_fmt_labels(lb)} {v:g}" for lb, v in sorted(series.items()))
        for name, hseries in sorted(histograms.items()):
            out.append(f"# HELP {name} {self.help.get(name, name)}\n# TYPE {name} histogram")
            for lb, buckets in sorted(hseries.items()):
                cumulative = 0.0
                for bound, count in zip(
                    (*LATENCY_BUCKETS, float("inf")), buckets[:-1], strict=True
                ):
                    cumulative += count
                    le = "+Inf" if bound == float("inf") else f"{bound:g}"
                    out.append(f"{name}_bucket{_fmt_labels((*lb, ('le', le)))} {cumulative:g}")
                out.append(f"{name}_sum{_fmt_labels(lb)} {buckets[-1]:g}")
                out.append(f"{name}_count{_fmt_labels(lb)} {cumulative:g}")
        return "\n".join(out) + "\n"
