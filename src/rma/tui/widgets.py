"""The dashboard's widgets: the status line, the worker detail, the pool summary, the plots."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from rich.console import Console, ConsoleOptions, Group, RenderableType, RenderResult
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text
from textual.widgets import DataTable
from textual_plotext import PlotextPlot

from rma.schemas.api import EventPublic, WorkerPublic
from rma.tui import view
from rma.tui.history import History

#: Plot line colours (RGB), in order, for up to eight series.
PLOT_COLOURS: tuple[tuple[int, int, int], ...] = (
    (86, 182, 194),
    (229, 152, 75),
    (152, 195, 121),
    (198, 120, 221),
    (97, 175, 239),
    (224, 108, 117),
    (229, 192, 123),
    (171, 178, 191),
)

CONNECTION_STYLE = {
    "connecting": ("◌ connecting", "yellow"),
    "live": ("● live", "green"),
    "polling": ("● polling", "yellow"),
    "lost": ("✖ lost", "bold red"),
}


class Spark:
    """A sparkline as wide as the space Rich gives it (the newest values, right-aligned)."""

    def __init__(self, values: Sequence[float], top: float | None = None) -> None:
        self.values = list(values)
        self.top = top

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        line = view.spark(self.values, max(1, options.max_width), self.top)
        yield Text(line, "cyan", no_wrap=True, overflow="crop")

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
        return Measurement(1, max(1, min(len(self.values), options.max_width)))


def status_line(
    *,
    connection: str,
    url: str,
    stats: dict[str, Any] | None,
    now: datetime,
    updated: datetime | None,
    error: str | None,
    width: int,
) -> Text:
    label, style = CONNECTION_STYLE[connection]
    text = Text.assemble(("rma top ", "bold"), (label, style))
    if connection == "lost" and error:
        text.append(f"  {error}", style="red")
        text.append("  (retrying)", style="dim")
        return text
    text.append(f"  {url}", style="dim")
    if stats:
        text.append(f"  v{stats.get('version', '?')}", style="dim")
        if width >= 100 and isinstance(stats.get("uptime_s"), int | float):
            text.append(f" up {view.duration(float(stats['uptime_s']))}", style="dim")
    if updated is not None:
        text.append(f"  {updated.astimezone(now.tzinfo):%H:%M:%S}", style="dim")
    return text


def worker_detail(
    w: WorkerPublic,
    *,
    now: datetime,
    history: History,
    events: Sequence[EventPublic],
) -> RenderableType:
    """Everything about one worker: identity, capabilities, labels, services, load, events."""
    caps = w.capabilities
    style = view.STATUS_STYLE.get(w.status.value, "")
    sep = (" · ", "dim")
    head = Text.assemble(
        (w.name, "bold"),
        (f" {w.id}  ", "dim"),
        (w.status.value, style),
        f"  tier {w.tier} {w.tier_name}  {w.transport.value}",
        (" trusted" if w.trusted else "", "dim"),
    )
    machine = Text.assemble(
        f"{caps.cpu_cores} cores",
        sep,
        f"{caps.memory_mb / 1024:.0f} GB RAM",
        sep,
        f"{caps.disk_free_mb / 1024:.0f} GB disk",
    )
    for g in caps.gpus:
        machine.append_text(Text.assemble(sep, f"{g.name} {g.memory_mb / 1024:.0f} GB"))
    if caps.os:
        machine.append_text(Text.assemble(sep, (f"{caps.os}/{caps.arch}", "dim")))
    if caps.docker:
        machine.append_text(Text.assemble(sep, ("docker", "dim")))
    labels = ", ".join(f"{k}={v}" for k, v in sorted(w.labels.items())) or "no labels"
    meta = Text.assemble(
        labels,
        sep,
        (f"v{w.version or '?'}", "dim"),
        sep,
        ("joined ", "dim"),
        view.age(w.registered_at, now),
        sep,
        ("beat ", "dim"),
        view.age(w.last_heartbeat_at, now),
    )

    trust = Text.assemble(
        ("reputation ", "dim"),
        (f"{w.reputation:.2f}", view.reputation_style(w)),
        sep,
        f"{w.verified} verified",
        sep,
        (f"{w.disagreements} disagreements", "yellow" if w.disagreements else ""),
    )
    if w.owner or w.labels.get("owner"):
        trust.append_text(Text.assemble(sep, ("owner ", "dim"), w.owner or w.labels["owner"]))
    if w.quarantined:
        trust.append_text(
            Text.assemble(
                "\n",
                ("QUARANTINED", "bold white on red"),
                (" no client traffic; k lets it back", "red"),
            )
        )

    services = Table.grid(padding=(0, 1))
    services.add_column()
    services.add_column()
    services.add_column()
    services.add_column()
    reported = {s.name: s for s in w.services}
    for name in sorted({*reported, *w.assignments}):
        s = reported.get(name)
        if s is None:
            services.add_row(name, Text("not reported", "dim"), "", "")
            continue
        health = Text("healthy", "green") if s.healthy else Text("not healthy", "red")
        services.add_row(
            Text(name, "bold"),
            Text(s.state.value),
            health,
            Text(f"{s.inflight} in flight" + (f"  {s.message}" if s.message else ""), "dim"),
        )

    load = Table.grid(padding=(0, 1))
    load.add_column(width=4)
    load.add_column(width=5, justify="right")
    load.add_column()
    current = {"cpu": w.load.cpu_percent, "mem": w.load.memory_percent, "gpu": w.load.gpu_percent}
    for metric in ("cpu", "mem", "gpu"):
        values = history.values("worker", w.id, metric)
        value = current[metric]
        if value is None and not values:
            continue
        load.add_row(
            Text(metric, "dim"),
            Text(view.percent(value), view.load_style(value)),
            Spark(values, top=100.0),
        )
    rps = history.values("worker", w.id, "rps") or history.values("worker", w.name, "rps")
    if rps:
        load.add_row(Text("req", "dim"), Text(view.rate(rps[-1])), Spark(rps))

    log = Table.grid(padding=(0, 1))
    log.add_column(style="dim")
    log.add_column()
    mine = [e for e in events if e.worker_id == w.id][-6:]
    for e in reversed(mine):
        log.add_row(view.clock_time(e.ts, now), Text(e.message, overflow="ellipsis"))

    parts: list[RenderableType] = [head, machine, meta, trust, Text("services", "bold dim")]
    parts.append(services if w.assignments or w.services else Text("  none assigned", "dim"))
    parts += [Text("load", "bold dim"), load, Text("recent events", "bold dim")]
    parts.append(log if mine else Text("  none", "dim"))
    return Group(*parts)


def pool_summary(
    stats: dict[str, Any] | None, history: History, *, compact: bool = False
) -> RenderableType:
    """Workers by status and by tier, and the pool's totals; ``compact`` fits 80 columns."""
    if not stats:
        return Text("waiting for the coordinator…", "dim")
    by_status = view.counts(stats, "by_status", view.STATUSES)
    by_tier = view.counts(stats, "by_tier", view.TIERS)
    inflight = history.get("pool", "all", "inflight")
    rps = history.get("pool", "all", "rps")
    queued = view.total_queued(stats)
    traffic = [
        ("in flight", str(int(inflight.last)) if inflight and inflight.last else "0"),
        ("req/s", view.rate(rps.last if rps else None)),
        ("waiting", "-" if queued is None else str(queued)),
    ]
    if compact:
        line1 = Text.assemble(("workers ", "bold"), (str(sum(by_status.values())), "bold"))
        for name, n in by_status.items():
            line1.append(f"  {name} ", view.STATUS_STYLE.get(name, ""))
            line1.append(str(n))
        line2 = Text.assemble(("tiers ", "bold"), ("(online) ", "dim"))
        line2.append("  ".join(f"{name} {n}" for name, n in by_tier.items()))
        line3 = Text.assemble(("traffic ", "bold"))
        line3.append("  ".join(f"{label} {value}" for label, value in traffic))
        return Group(line1, line2, line3)

    grid = Table.grid(padding=(0, 1))
    grid.add_column(width=10)
    grid.add_column(justify="right", width=4)
    grid.add_column()
    total = max(1, sum(by_status.values()))
    grid.add_row(Text("workers", "bold"), Text(str(sum(by_status.values())), "bold"), "")
    for name, n in by_status.items():
        style = view.STATUS_STYLE.get(name, "")
        grid.add_row(Text(name, style), str(n), Text(view.bar(n / total * 100, 14), style))
    grid.add_row("", "", "")
    grid.add_row(Text("tiers", "bold"), "", Text("online + draining", "dim"))
    tiers_total = max(1, sum(by_tier.values()))
    for name, n in by_tier.items():
        grid.add_row(name, str(n), Text(view.bar(n / tiers_total * 100, 14), "cyan"))
    grid.add_row("", "", "")
    grid.add_row(Text("traffic", "bold"), "", "")
    for label, value in traffic:
        grid.add_row(label, value, "")
    if rps and len(rps):
        grid.add_row("", "", Text(view.spark(rps.values(), 14), "cyan"))
    return grid


class MetricPlot(PlotextPlot):
    """One plot over the last minutes: a line per service or worker, x in minutes ago.

    The legend is the border's subtitle (a legend inside the plot hides the data in 80x24).
    """

    def __init__(self, title: str, *, window: float = 300.0, id: str | None = None) -> None:
        super().__init__(id=id)
        self.border_title = title
        self.window = window

    def show(
        self,
        series: Sequence[tuple[str, list[float], list[float]]],
        now_t: float,
        *,
        y_max: float | None = None,
    ) -> None:
        """``series``: (label, times, values); times are epoch seconds."""
        plt = self.plt
        plt.clear_data()
        plt.clear_figure()
        legend = Text()
        top = 0.0
        for i, (label, times, values) in enumerate(series[: len(PLOT_COLOURS)]):
            points = [(t - now_t, v) for t, v in zip(times, values, strict=True)]
            points = [(x, v) for x, v in points if x >= -self.window]
            if not points:
                continue
            rgb = PLOT_COLOURS[i]
            plt.plot([x for x, _ in points], [v for _, v in points], color=rgb, marker="braille")
            top = max(top, *(v for _, v in points))
            if legend:
                legend.append(" ")
            legend.append("━", f"rgb({rgb[0]},{rgb[1]},{rgb[2]})")
            legend.append(label)
        minutes = int(self.window // 60)
        ticks = [-60.0 * m for m in range(minutes, -1, -1)]
        plt.xticks(ticks, [f"-{m}m" if m else "now" for m in range(minutes, -1, -1)])
        plt.xlim(-self.window, 0)
        plt.ylim(0, y_max if y_max is not None else max(1.0, top * 1.15))
        self.border_subtitle = legend.markup if legend else "no data yet"
        self.refresh()


def fit(cell: Text, width: int | None) -> Text:
    """`cell` cut to a fixed column `width` with a visible marker (…), as it is if it fits."""
    if width is None or cell.cell_len <= width:
        return cell
    cut = cell.copy()
    cut.truncate(width, overflow="ellipsis")
    return cut


def set_columns(table: DataTable[Any], spec: list[tuple[str, str, int | None]]) -> None:
    """Give ``table`` these (key, label, width) columns, rebuilding them only when they change."""
    current = [
        (str(c.key.value), c.label.plain, c.width if not c.auto_width else None)
        for c in table.ordered_columns
    ]
    if current == spec:
        return
    table.clear(columns=True)
    for key, label, width in spec:
        table.add_column(label, key=key, width=width)
