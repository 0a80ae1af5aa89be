"""What the dashboard shows, as plain data: rows, sorting, filtering, health.  No Textual here.

Everything that depends on the time takes ``now`` so tests and snapshots can freeze it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from rma.schemas.api import WorkerPublic

STATUS_STYLE = {
    "online": "green",
    "draining": "yellow",
    "paused": "cyan",
    "offline": "red",
    "left": "bright_black",
    "removed": "bright_black",
}
TOKEN_STYLE = {
    "active": "green",
    "expired": "bright_black",
    "used": "bright_black",
    "revoked": "red",
}
STATUSES = ("online", "draining", "offline", "left", "removed")
TIERS = ("gpu", "service", "data")
TIER_SHORT = {"gpu": "gpu", "service": "svc", "data": "data"}

#: Worker table columns: (key, header).  ``key`` is what :func:`sort_workers` understands.
COLUMNS: tuple[tuple[str, str], ...] = (
    ("name", "NAME"),
    ("status", "STATUS"),
    ("tier", "TIER"),
    ("services", "SERVICES"),
    ("cpu", "CPU"),
    ("mem", "MEM"),
    ("gpu", "GPU"),
    ("inflight", "INFL"),
    ("rep", "REP"),
    ("heartbeat", "BEAT"),
    ("transport", "TRANSPORT"),
)
SORT_KEYS = tuple(k for k, _ in COLUMNS)
_STATUS_ORDER = {s: i for i, s in enumerate(STATUSES)}


def age(ts: datetime | None, now: datetime) -> str:
    """``4s``, ``3m``, ``2.5h``, ``3d``; ``never`` for ``None``."""
    if ts is None:
        return "never"
    secs = max(0.0, (now - ts).total_seconds())
    if secs < 60:
        return f"{secs:.0f}s"
    if secs < 3600:
        return f"{secs // 60:.0f}m"
    if secs < 86400:
        return f"{secs / 3600:.1f}h"
    return f"{secs / 86400:.0f}d"


def clock_time(ts: datetime, now: datetime) -> str:
    """``14:03:07`` today (in ``now``'s time zone), ``28 May 09:15`` before."""
    local = ts.astimezone(now.tzinfo)
    if local.date() == now.date():
        return f"{local:%H:%M:%S}"
    return f"{local:%d %b %H:%M}"


def duration(secs: float) -> str:
    """Uptime as ``1d 2h``, ``3h 4m``, ``5m 6s``."""
    s = int(max(0, secs))
    d, rem = divmod(s, 86400)
    h, rem = divmod(rem, 3600)
    m, sec = divmod(rem, 60)
    if d:
        return f"{d}d {h}h"
    if h:
        return f"{h}h {m}m"
    return f"{m}m {sec}s"


def percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}%"


def inflight(w: WorkerPublic) -> int:
    return sum(s.inflight for s in w.services)


def services_text(w: WorkerPublic) -> str:
    """``llm✓ ocr✗`` for reported services, then assigned ones not yet reported as ``name…``."""
    seen = {s.name for s in w.services}
    parts = [f"{s.name}{'✓' if s.healthy else '✗'}" for s in w.services]
    parts += [f"{n}…" for n in w.assignments if n not in seen]
    return " ".join(parts) or "-"


def reputation_text(w: WorkerPublic, *, narrow: bool = False) -> str:
    """``0.97``; a quarantined worker's is marked: ``0.12 Q`` (``QUAR`` in 80 columns)."""
    if w.quarantined:
        return "QUAR" if narrow else f"{w.reputation:.2f} Q"
    return f"{w.reputation:.2f}"


def reputation_style(w: WorkerPublic) -> str:
    """Quarantined: white on red; no verified result yet: dim; then green, plain, yellow."""
    if w.quarantined:
        return "bold white on red"
    if w.verified == 0:
        return "bright_black"
    if w.reputation >= 0.8:
        return "green"
    return "" if w.reputation >= 0.5 else "yellow"


def trust_words(w: WorkerPublic) -> str:
    """What the filter's ``trust:`` field matches: ``quarantined`` and/or ``trusted``."""
    words = ["quarantined"] if w.quarantined else []
    if w.trusted:
        words.append("trusted")
    return " ".join(words)


def load_style(value: float | None) -> str:
    if value is None:
        return "bright_black"
    if value >= 90:
        return "red"
    if value >= 70:
        return "yellow"
    return ""


def _sort_value(w: WorkerPublic, key: str) -> Any:
    load = w.load
    return {
        "name": (w.name.lower(), w.id),
        "status": _STATUS_ORDER.get(w.status.value, 99),
        "tier": w.tier,
        "services": services_text(w),
        "cpu": load.cpu_percent,
        "mem": load.memory_percent,
        "gpu": -1.0 if load.gpu_percent is None else load.gpu_percent,
        "inflight": inflight(w),
        "rep": (not w.quarantined, w.reputation),
        "heartbeat": -(w.last_heartbeat_at.timestamp()) if w.last_heartbeat_at else float("inf"),
        "transport": w.transport.value,
    }[key]


def sort_workers(
    workers: Iterable[WorkerPublic], key: str = "name", reverse: bool = False
) -> list[WorkerPublic]:
    """Sorted by one column; ties keep name order.  ``heartbeat`` sorts freshest first."""
    if key not in SORT_KEYS:
        raise ValueError(f"cannot sort by {key!r}; one of {', '.join(SORT_KEYS)}")
    by_name = sorted(workers, key=lambda w: (w.name.lower(), w.id))
    return sorted(by_name, key=lambda w: _sort_value(w, key), reverse=reverse)


def _haystack(w: WorkerPublic) -> dict[str, str]:
    return {
        "name": w.name.lower(),
        "id": w.id.lower(),
        "status": w.status.value,
        "tier": f"{w.tier} {w.tier_name}",
        "service": " ".join([*(s.name for s in w.services), *w.assignments]).lower(),
        "transport": w.transport.value,
        "label": " ".join(f"{k}={v}" for k, v in w.labels.items()).lower(),
        "trust": trust_words(w),
    }


def filter_workers(workers: Iterable[WorkerPublic], query: str) -> list[WorkerPublic]:
    """Every word must match: ``gpu``, ``status:offline``, ``service:llm``, ``label:zone=eu``,
    ``trust:quarantined``.

    A bare word matches any field (name, id, status, tier, services, transport, labels, trust).
    """
    terms = query.lower().split()
    result = []
    for w in workers:
        hay = _haystack(w)
        everything = " ".join(hay.values())
        ok = True
        for term in terms:
            field, sep, want = term.partition(":")
            if sep and field in hay:
                ok = want in hay[field]
            elif sep and field + "s" in hay:
                ok = want in hay[field + "s"]
            else:
                ok = term in everything
            if not ok:
                break
        if ok:
            result.append(w)
    return result


# --- health ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServiceHealth:
    """One catalog service: healthy replicas against what the catalog wants, and its queue."""

    name: str
    tier: int
    kind: str
    wanted: int  # 0: on every worker that fits
    assigned: int
    healthy: int
    queued: int | None  # None: the coordinator does not report queue depth

    @property
    def target(self) -> int:
        """How many healthy replicas would be "all good"."""
        return self.wanted if self.wanted else self.assigned

    @property
    def state(self) -> str:
        """``ok``, ``degraded`` (fewer healthy than wanted), ``down`` (none healthy), ``idle``."""
        if self.target == 0:
            return "idle"
        if self.healthy == 0:
            return "down"
        if self.healthy < self.target:
            return "degraded"
        return "ok"


HEALTH_STYLE = {"ok": "green", "degraded": "yellow", "down": "red", "idle": "bright_black"}

_QUEUE_KEYS = ("queued", "queue_depth", "waiting", "queue")


def _int_or_none(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return int(value)
    return None


def queue_depths(stats: Mapping[str, Any]) -> dict[str, int]:
    """Requests waiting, per service, wherever the coordinator puts them (absent: empty).

    Understood: a ``queued``/``queue_depth``/``waiting`` number on each ``services`` entry or each
    ``usage.by_service`` entry, or ``stats["queue"]`` as ``{"by_service": {name: n}}``,
    ``{name: n}`` or a list of ``{service, depth|queued}``.
    """
    found: dict[str, int] = {}
    rows: list[Any] = list(stats.get("services") or [])
    usage = stats.get("usage")
    if isinstance(usage, Mapping):
        rows += list(usage.get("by_service") or [])
    for row in rows:
        if not isinstance(row, Mapping):
            continue
        name = row.get("name") or row.get("service")
        for key in _QUEUE_KEYS:
            n = _int_or_none(row.get(key))
            if isinstance(name, str) and n is not None:
                found[name] = n
                break
    queue = stats.get("queue")
    if isinstance(queue, Mapping):
        per = queue.get("by_service", queue)
        if isinstance(per, Mapping):
            for name, value in per.items():
                n = _int_or_none(value)
                if n is None and isinstance(value, Mapping):
                    n = _int_or_none(value.get("depth", value.get("queued")))
                if n is not None:
                    found[str(name)] = n
        elif isinstance(per, list):
            for row in per:
                if isinstance(row, Mapping) and isinstance(row.get("service"), str):
                    n = _int_or_none(row.get("depth", row.get("queued")))
                    if n is not None:
                        found[row["service"]] = n
    return found


def total_queued(stats: Mapping[str, Any]) -> int | None:
    """The whole pool's waiting requests, or ``None`` when the coordinator does not say."""
    queue = stats.get("queue")
    if isinstance(queue, Mapping):
        n = _int_or_none(queue.get("depth", queue.get("total")))
        if n is not None:
            return n
    n = _int_or_none(queue)
    if n is not None:
        return n
    per = queue_depths(stats)
    return sum(per.values()) if per else None


def service_health(stats: Mapping[str, Any]) -> list[ServiceHealth]:
    queued = queue_depths(stats)
    rows = []
    for s in stats.get("services") or []:
        if not isinstance(s, Mapping) or "name" not in s:
            continue
        name = str(s["name"])
        rows.append(
            ServiceHealth(
                name=name,
                tier=int(s.get("tier", 0) or 0),
                kind=str(s.get("kind", "")),
                wanted=int(s.get("wanted", 0) or 0),
                assigned=int(s.get("assigned", 0) or 0),
                healthy=int(s.get("healthy", 0) or 0),
                queued=queued.get(name),
            )
        )
    return rows


def placed_services(
    rows: Sequence[ServiceHealth], listed: set[str] | None = None
) -> tuple[list[ServiceHealth], list[str]]:
    """(the services to show, the names of data services that the pool does not want now).

    A data service (kind ``tcp``: postgres, redis, ...) runs only where a worker offers it; on a
    pool whose workers offer none (a local ``rma up``), it is not "down", just not placed.
    ``listed``: the services ``GET /api/admin/services`` lists (the coordinator's judgement:
    a data service with a backup but no holder is listed, and down); without it, a data service
    is shown once it is assigned somewhere.
    """

    def wanted(h: ServiceHealth) -> bool:
        if h.kind != "tcp":
            return True
        if listed is not None:
            return h.name in listed
        return h.assigned > 0 or h.healthy > 0

    shown = [h for h in rows if wanted(h)]
    unplaced = sorted(h.name for h in rows if h not in shown)
    return shown, unplaced


def usage_rows(stats: Mapping[str, Any], group: str) -> list[Mapping[str, Any]]:
    """``stats["usage"]["by_service"|"by_worker"]`` when present, else ``[]``."""
    usage = stats.get("usage")
    if not isinstance(usage, Mapping):
        return []
    rows = usage.get(group)
    return [r for r in rows if isinstance(r, Mapping)] if isinstance(rows, list) else []


def counts(stats: Mapping[str, Any], key: str, names: Sequence[str]) -> dict[str, int]:
    """``stats["workers"]["by_status"|"by_tier"]`` with every name present (0 when absent)."""
    workers = stats.get("workers")
    got = workers.get(key, {}) if isinstance(workers, Mapping) else {}
    got = got if isinstance(got, Mapping) else {}
    return {n: int(got.get(n, 0) or 0) for n in names}


def bar(value: float | None, width: int = 10) -> str:
    """A text gauge: ``███████░░░`` for 70%."""
    if value is None:
        return "·" * width
    filled = round(min(max(value, 0.0), 100.0) / 100 * width)
    return "█" * filled + "░" * (width - filled)


_SPARKS = "▁▂▃▄▅▆▇█"


def spark(values: Sequence[float], width: int = 30, top: float | None = None) -> str:
    """A one-line sparkline of the last ``width`` values, scaled to ``top`` (default: their max)."""
    tail = list(values)[-width:]
    if not tail:
        return ""
    high = top if top is not None else max(tail)
    if high <= 0:
        return _SPARKS[0] * len(tail)
    last = len(_SPARKS) - 1
    return "".join(_SPARKS[min(last, max(0, round(v / high * last)))] for v in tail)


def rate(value: float | None) -> str:
    if value is None:
        return "-"
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"
