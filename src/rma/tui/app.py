"""``rma admin top``: the Textual app.

Data comes from an injected :class:`rma.client.CoordinatorClient` factory (tests pass a real
client or a stub).  Two workers keep it fresh: one polls (workers, stats, tokens, and events while
the stream is down) every ``refresh`` seconds, one follows the event stream and wakes the poller
when something happens.  A failed poll shows the coordinator as lost and is retried; nothing a
coordinator does or fails to do ends the app.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from datetime import datetime
from typing import Any, ClassVar

from rich.text import Text
from textual import on, work
from textual.app import App, ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Input, Static, TabbedContent, TabPane, Tabs
from textual.widgets.data_table import ColumnKey

from rma.client import CoordinatorClient, RmaError
from rma.schemas.api import CreditBalance, EventPublic, TokenPublic, WorkerPublic
from rma.tui import view
from rma.tui.history import History
from rma.tui.panes.credits import CreditsPane
from rma.tui.panes.services import ServicesPane
from rma.tui.screens import ConfirmScreen, HelpScreen
from rma.tui.widgets import MetricPlot, pool_summary, status_line, worker_detail
from rma.tui.widgets import fit as _fit
from rma.tui.widgets import set_columns as _set_columns

#: Event kinds that change what the workers table shows: the poller is woken for these.
_WORKER_EVENTS = frozenset(
    {
        "joined",
        "rejoined",
        "left",
        "offline",
        "online",
        "removed",
        "drained",
        "undrained",
        "draining",
        "service",
        "failover",
        "quarantined",
        "unquarantined",
    }
)
EVENT_STYLE = {
    "joined": "green",
    "rejoined": "green",
    "online": "green",
    "undrained": "green",
    "left": "bright_black",
    "offline": "red",
    "removed": "red",
    "suspect": "bold red",
    "failover": "magenta",
    "drained": "yellow",
    "draining": "yellow",
    "service": "cyan",
    "token_revoked": "yellow",
    "quarantined": "bold red",
    "unquarantined": "green",
    "verification_failed": "red",
}
MAX_EVENTS = 500
#: From this many columns on, the detail sits beside the table and every column shows.
WIDE = 120
#: (key, header, fixed width or None for auto); 80 columns fit the narrow set.
WIDE_WORKER_COLUMNS: list[tuple[str, str, int | None]] = [
    (key, label, None) for key, label in view.COLUMNS
]
NARROW_WORKER_COLUMNS: list[tuple[str, str, int | None]] = [
    ("name", "NAME", 11),
    ("status", "STATUS", 8),
    ("tier", "TIER", 4),
    ("services", "SERVICES", 12),
    ("cpu", "CPU", 4),
    ("mem", "MEM", 4),
    ("gpu", "GPU", 4),
    ("inflight", "INF", 3),
    ("rep", "REP", 4),
    ("heartbeat", "BEAT", 4),
]
WIDE_SERVICE_COLUMNS: list[tuple[str, str, int | None]] = [
    ("name", "SERVICE", None),
    ("tier", "TIER", None),
    ("healthy", "HEALTHY", None),
    ("state", "STATE", None),
    ("queued", "WAITING", None),
    ("rps", "REQ/S", None),
    ("p50", "P50 MS", None),
    ("p95", "P95 MS", None),
    ("eps", "ERR/S", None),
    ("trend", "REQ/S, LAST MINUTES", 30),
]
NARROW_SERVICE_COLUMNS: list[tuple[str, str, int | None]] = [
    ("name", "SERVICE", 10),
    ("healthy", "HEALTHY", 7),
    ("state", "STATE", 8),
    ("queued", "WAIT", 4),
    ("rps", "REQ/S", 5),
    ("p50", "P50", 4),
    ("p95", "P95", 4),
    ("eps", "ERR/S", 5),
    ("trend", "TREND", 8),
]
TABS = ("workers", "pool", "load", "events", "tokens", "services", "credits")


def _local_now() -> datetime:
    return datetime.now().astimezone()


class TopApp(App[None]):
    """The live dashboard over the admin API."""

    TITLE = "rma top"
    CSS_PATH = "top.tcss"
    HORIZONTAL_BREAKPOINTS = [(0, "-narrow"), (120, "-wide")]
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("q", "quit", "Quit"),
        # Textual binds ctrl+c to copy (and a "press ctrl+q" hint); here it quits, as it says.
        Binding("ctrl+c", "quit", "Quit", show=False, priority=True),
        Binding("question_mark", "help", "Keys", key_display="?"),
        Binding("1", "tab('workers')", "Workers", show=False),
        Binding("2", "tab('pool')", "Pool", show=False),
        Binding("3", "tab('load')", "Load", show=False),
        Binding("4", "tab('events')", "Events", show=False),
        Binding("5", "tab('tokens')", "Tokens", show=False),
        Binding("6", "tab('services')", "Services", show=False),
        Binding("7", "tab('credits')", "Credits", show=False),
        Binding("slash", "filter", "Filter", key_display="/"),
        Binding("escape", "clear_filter", "Clear filter", show=False),
        Binding("s", "sort", "Sort"),
        Binding("S", "sort_reverse", "Reverse", show=False),
        Binding("a", "toggle_all", "All", show=False),
        Binding("d", "drain", "Drain"),
        Binding("u", "undrain", "Undrain"),
        Binding("x", "remove", "Remove"),
        Binding("k", "quarantine", "Quarantine", show=False),
        Binding("v", "revoke", "Revoke"),
        Binding("r", "refresh", "Refresh", show=False),
    ]
    #: For the help screen: (keys, what they do).
    KEYS: ClassVar[list[tuple[str, str]]] = [
        ("1-7", "switch tab: workers, pool, load, events, tokens, services, credits"),
        ("tab / shift+tab", "move focus"),
        ("↑ ↓ / click", "select a worker (its detail shows beside or below)"),
        ("/", "filter workers; esc clears"),
        ("s / S", "sort by the next column / reverse (or click a header)"),
        ("a", "show left and removed workers too"),
        ("d / u", "drain / undrain the selected worker (asks first)"),
        ("x", "remove the selected worker (asks first)"),
        ("k", "quarantine the selected worker, or let a quarantined one back (asks first)"),
        ("v", "revoke the selected join token (tokens tab, asks first)"),
        ("r", "refresh now"),
        ("?", "this help"),
        ("q / ctrl+c", "quit"),
    ]

    def __init__(
        self,
        client_factory: Callable[[], CoordinatorClient],
        *,
        refresh: float = 2.0,
        clock: Callable[[], datetime] = _local_now,
        history: History | None = None,
        retry_max: float = 15.0,
    ) -> None:
        super().__init__()
        self.client_factory = client_factory
        self.refresh_interval = max(0.1, refresh)
        self.clock = clock
        self.history = history if history is not None else History()
        self.retry_max = retry_max
        self.client: CoordinatorClient | None = None
        #: An error that makes running pointless (no or wrong admin key); run_top raises it.
        self.fatal: RmaError | None = None

        self.pool_workers: list[WorkerPublic] = []
        self.stats: dict[str, Any] | None = None
        self.tokens: list[TokenPublic] = []
        #: ``GET /api/admin/services`` (None: the coordinator has no such route).
        self.services: list[dict[str, Any]] | None = None
        #: ``GET /api/admin/credits?by=owner``, read while the Credits tab is shown (None: not
        #: read yet, or the coordinator keeps no ledger; ``credits_loaded`` tells which).
        self.credits: list[CreditBalance] | None = None
        self.credits_loaded = False
        self.events: list[EventPublic] = []
        self._event_ids: set[int] = set()
        self.connection = "connecting"
        self.error: str | None = None
        self.updated: datetime | None = None
        self.stream_attached = False
        self.polls = 0
        self.failures = 0

        self.sort_key = "name"
        self.sort_reverse = False
        self.show_all = False
        self.filter_text = ""
        self.selected_id: str | None = None

        self._top_ready = False
        self._wake = asyncio.Event()
        #: Set after the first successful poll (tests and snapshots wait on it).
        self.loaded = asyncio.Event()

    @property
    def main(self) -> Screen[Any]:
        """The dashboard's own screen (queries go here even while a modal is on top)."""
        return self.screen_stack[0] if self.screen_stack else self.screen

    # --- layout -----------------------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        yield Static(id="status")
        with TabbedContent(id="tabs", initial="workers"):
            with TabPane("Workers", id="workers"):
                yield Input(
                    placeholder="/ to filter: gpu, status:offline, service:llm, label:zone=eu",
                    id="filter",
                    compact=True,
                )
                with Horizontal(id="workers-body"):
                    table: DataTable[Any] = DataTable(
                        id="workers-table", cursor_type="row", zebra_stripes=True
                    )
                    yield table
                    with VerticalScroll(id="detail"):
                        yield Static(id="detail-body")
            with TabPane("Pool", id="pool"), Horizontal(id="pool-body"):
                yield Static(id="summary")
                with Vertical(id="services-pane"):
                    yield DataTable(id="services-table", cursor_type="row", zebra_stripes=True)
                    yield Static(id="unplaced")
            with TabPane("Load", id="load"), Vertical(id="plots"):
                with Horizontal(classes="plot-row"):
                    yield MetricPlot("requests/s by service", id="plot-rps")
                    yield MetricPlot("latency p95 ms by service", id="plot-latency")
                with Horizontal(classes="plot-row"):
                    yield MetricPlot("errors/s by service", id="plot-errors")
                    yield MetricPlot("CPU % by worker", id="plot-cpu")
                with Horizontal(classes="plot-row", id="plot-row-3"):
                    yield MetricPlot("GPU % by worker", id="plot-gpu")
                    yield MetricPlot("in flight by worker", id="plot-inflight")
            with TabPane("Events", id="events"):
                yield DataTable(id="events-table", cursor_type="row", zebra_stripes=True)
            with TabPane("Tokens", id="tokens"):
                yield DataTable(id="tokens-table", cursor_type="row", zebra_stripes=True)
            with TabPane("Services", id="services"):
                yield ServicesPane(id="scheduler-pane")
            with TabPane("Credits", id="credits"):
                yield CreditsPane(id="credits-pane")
        yield Footer()

    def on_mount(self) -> None:
        events = self.main.query_one("#events-table", DataTable)
        for key, label in (("ts", "TIME"), ("kind", "KIND"), ("message", "MESSAGE")):
            events.add_column(label, key=key)
        tokens = self.main.query_one("#tokens-table", DataTable)
        for key, label in (
            ("id", "ID"),
            ("label", "LABEL"),
            ("status", "STATUS"),
            ("used", "USED"),
            ("expires", "EXPIRES"),
        ):
            tokens.add_column(label, key=key)
        self.main.query_one("#workers-table").focus()
        self._top_ready = True
        self._show_status()
        try:
            self.client = self.client_factory()
        except RmaError as exc:
            self.fatal = exc
            self.exit(return_code=1)
            return
        except Exception as exc:  # a bad CA file, a bad URL: say so, no traceback
            self.fatal = RmaError("bad_config", f"cannot make a client: {exc}")
            self.exit(return_code=1)
            return
        self.poll_loop()
        self.follow_loop()

    async def on_unmount(self) -> None:
        if self.client is not None:
            with contextlib.suppress(Exception):
                await self.client.aclose()

    # --- data: polling ----------------------------------------------------------------------------

    @work(exclusive=True, group="poll")
    async def poll_loop(self) -> None:
        """Poll forever; back off while the coordinator is lost; never raise."""
        while True:
            ok = await self.poll_once()
            delay = self.refresh_interval
            if not ok:
                delay = min(self.retry_max, self.refresh_interval * 2 ** min(self.failures - 1, 4))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=delay)
            self._wake.clear()

    async def poll_once(self) -> bool:
        client = self.client
        if client is None:
            return False
        try:
            workers, stats, tokens, services = await asyncio.gather(
                client.workers(), client.stats(), client.tokens(), _services(client)
            )
            events = None if self.stream_attached else await client.events(200)
            want_credits = self._active_tab() == "credits"
            credits = await _credits(client) if want_credits else None
        except RmaError as exc:
            self._lost(exc)
            return False
        except Exception as exc:  # a bad answer must not end the dashboard
            self._lost(RmaError("bad_response", f"{type(exc).__name__}: {exc}"))
            return False
        was_lost = self.connection == "lost"
        self.pool_workers, self.stats, self.tokens = workers, stats, tokens
        self.services = services
        if want_credits:
            self.credits, self.credits_loaded = credits, True
        self.polls += 1
        self.failures = 0
        self.error = None
        now = self.clock()
        self.updated = now
        self.history.record(now.timestamp(), stats, workers)
        if events is not None:
            self.add_events(events)
        self.connection = "live" if self.stream_attached else "polling"
        if was_lost:
            self.notify("the coordinator is back", title="reconnected")
            self.follow_loop()
        self._redraw()
        self.loaded.set()
        return True

    def _lost(self, exc: RmaError) -> None:
        auth = exc.code == "no_admin_key" or exc.status in (401, 403)
        if auth and self.polls == 0:
            self.fatal = exc
            self.exit(return_code=1)
            return
        self.failures += 1
        self.error = exc.message
        self.connection = "lost"
        self.add_class("-lost")
        self._show_status()

    def action_refresh(self) -> None:
        self._wake.set()

    # --- data: the event stream ------------------------------------------------------------------

    @work(exclusive=True, group="follow")
    async def follow_loop(self) -> None:
        """Follow ``/api/admin/events?follow=true``; on a break, retry with backoff."""
        backoff = 1.0
        while True:
            client = self.client
            if client is None:
                return
            since = self.events[-1].id if self.events else None
            try:
                self.stream_attached = True
                self._stream_changed()
                async for event in client.follow_events(since=since):
                    backoff = 1.0
                    self.add_events([event])
                    if event.kind in _WORKER_EVENTS or event.kind.startswith("worker"):
                        self._wake.set()
            except Exception as exc:  # RmaError for transport; anything else is a bad answer
                self.log.warning(f"event stream broke: {exc}")
            self.stream_attached = False
            self._stream_changed()
            await asyncio.sleep(backoff)
            backoff = min(self.retry_max, backoff * 2)

    def _stream_changed(self) -> None:
        if self.connection in ("live", "polling"):
            self.connection = "live" if self.stream_attached else "polling"
            self._show_status()

    def add_events(self, events: list[EventPublic]) -> None:
        fresh = [e for e in events if e.id not in self._event_ids]
        if not fresh:
            return
        self._event_ids.update(e.id for e in fresh)
        self.events = sorted([*self.events, *fresh], key=lambda e: e.id)[-MAX_EVENTS:]
        self._event_ids = {e.id for e in self.events}
        if self.drawable:
            self._draw_events()
            self._draw_detail()

    # --- drawing ----------------------------------------------------------------------------------

    def _redraw(self) -> None:
        if not self.drawable:
            return
        self.remove_class("-lost")
        self._show_status()
        self._draw_workers()
        self._draw_detail()
        self._draw_pool()
        self._draw_load()
        self._draw_tokens()
        self._draw_services()
        self._draw_credits()

    @property
    def drawable(self) -> bool:
        """Mounted and not shutting down: there is something to draw on."""
        return self._top_ready and self.is_running and bool(self.screen_stack)

    def _show_status(self) -> None:
        if not self.drawable:
            return
        status = self.main.query_one("#status", Static)
        status.update(
            status_line(
                connection=self.connection,
                url=self.client.base_url if self.client else "",
                stats=self.stats,
                now=self.clock(),
                updated=self.updated,
                error=self.error,
                width=self.size.width,
            )
        )

    def visible_workers(self) -> list[WorkerPublic]:
        rows = self.pool_workers
        if (
            not self.show_all
            and "left" not in self.filter_text
            and "removed" not in self.filter_text
        ):
            rows = [w for w in rows if w.status.value not in ("left", "removed")]
        rows = view.filter_workers(rows, self.filter_text)
        return view.sort_workers(rows, self.sort_key, self.sort_reverse)

    @property
    def narrow(self) -> bool:
        return self.size.width < WIDE

    def _draw_workers(self) -> None:
        table = self.main.query_one("#workers-table", DataTable)
        now = self.clock()
        rows = self.visible_workers()
        narrow = self.narrow
        spec = [
            (
                key,
                label + _arrow(key, self.sort_key, self.sort_reverse),
                width + 2 if width is not None and key == self.sort_key else width,
            )
            for key, label, width in (NARROW_WORKER_COLUMNS if narrow else WIDE_WORKER_COLUMNS)
        ]
        scroll = table.scroll_y
        _set_columns(table, spec)
        table.clear()
        for w in rows:
            load = w.load
            cells = {
                "name": Text(w.name, "bold", overflow="ellipsis", no_wrap=True),
                "status": Text(w.status.value, view.STATUS_STYLE.get(w.status.value, "")),
                "tier": Text(
                    view.TIER_SHORT.get(w.tier_name, w.tier_name) if narrow else w.tier_name
                ),
                "services": _services_cell(w),
                "cpu": Text(view.percent(load.cpu_percent), view.load_style(load.cpu_percent)),
                "mem": Text(
                    view.percent(load.memory_percent), view.load_style(load.memory_percent)
                ),
                "gpu": Text(view.percent(load.gpu_percent), view.load_style(load.gpu_percent)),
                "inflight": Text(str(view.inflight(w)), justify="right"),
                "rep": Text(view.reputation_text(w, narrow=narrow), view.reputation_style(w)),
                "heartbeat": Text(view.age(w.last_heartbeat_at, now), _beat_style(w, now)),
                "transport": Text(w.transport.value, "dim"),
            }
            table.add_row(*(_fit(cells[key], width) for key, _, width in spec), key=w.id)
        ids = [w.id for w in rows]
        if self.selected_id in ids:
            table.move_cursor(row=ids.index(self.selected_id), animate=False, scroll=False)
        elif ids:
            self.selected_id = ids[0]
            table.move_cursor(row=0, animate=False, scroll=False)
        else:
            self.selected_id = None
        table.scroll_y = scroll

    def selected_worker(self) -> WorkerPublic | None:
        for w in self.pool_workers:
            if w.id == self.selected_id:
                return w
        return None

    def _draw_detail(self) -> None:
        if not self.drawable:  # a late table event while the app shuts down
            return
        body = self.main.query_one("#detail-body", Static)
        w = self.selected_worker()
        if w is None:
            if not self.pool_workers:
                hint = (
                    "no workers yet: `rma admin tokens create`, then on a machine `rma worker join`"
                )
            elif not self.visible_workers():
                hint = "no worker matches the filter (escape clears it; `a` shows all)"
            else:
                hint = "select a worker to see its detail"
            body.update(Text(hint, "dim"))
            return
        body.update(worker_detail(w, now=self.clock(), history=self.history, events=self.events))

    def _draw_pool(self) -> None:
        narrow = self.narrow
        summary = pool_summary(self.stats, self.history, compact=narrow)
        self.main.query_one("#summary", Static).update(summary)
        table = self.main.query_one("#services-table", DataTable)
        _set_columns(table, NARROW_SERVICE_COLUMNS if narrow else WIDE_SERVICE_COLUMNS)
        keys = [str(c.key.value) for c in table.ordered_columns]
        trend_width = table.columns[ColumnKey("trend")].width
        table.clear()
        usage = {str(r.get("service")): r for r in view.usage_rows(self.stats or {}, "by_service")}
        widths = {
            key: width
            for key, _, width in (NARROW_SERVICE_COLUMNS if narrow else WIDE_SERVICE_COLUMNS)
        }
        listed = None if self.services is None else {str(r.get("name")) for r in self.services}
        shown, unplaced = view.placed_services(view.service_health(self.stats or {}), listed)
        self.main.query_one("#unplaced", Static).update(
            Text(
                f"not placed on this pool (no worker offers them): {', '.join(unplaced)}",
                "bright_black",
            )
            if unplaced
            else ""
        )
        for h in shown:
            u = usage.get(h.name, {})
            rps = self.history.get("service", h.name, "rps")
            eps = self.history.get("service", h.name, "eps")
            style = view.HEALTH_STYLE[h.state]
            target = "all" if h.wanted == 0 else str(h.wanted)
            cells = {
                "name": Text(h.name, "bold"),
                "tier": Text(str(h.tier)),
                "healthy": Text(f"{h.healthy}/{target}", style),
                "state": Text(h.state, style),
                "queued": Text(
                    "-" if h.queued is None else str(h.queued), "yellow" if h.queued else ""
                ),
                "rps": Text(view.rate(rps.last if rps else None), justify="right"),
                "p50": Text(_ms(u.get("p50_ms")), justify="right"),
                "p95": Text(_ms(u.get("p95_ms")), justify="right"),
                "eps": Text(
                    view.rate(eps.last if eps else None), "red" if eps and eps.last else ""
                ),
                "trend": Text(view.spark(rps.values() if rps else [], trend_width), "cyan"),
            }
            table.add_row(*(_fit(cells[k], widths.get(k)) for k in keys), key=h.name)

    def _draw_services(self) -> None:
        pane = self.main.query_one("#scheduler-pane", ServicesPane)
        pane.show(self.services, narrow=self.narrow, now=self.clock())

    def _draw_credits(self) -> None:
        pane = self.main.query_one("#credits-pane", CreditsPane)
        pane.show(self.credits, self.pool_workers, loaded=self.credits_loaded, narrow=self.narrow)

    def _active_tab(self) -> str:
        if not self.drawable:
            return ""
        return str(self.main.query_one(TabbedContent).active)

    def _draw_load(self) -> None:
        now_t = self.clock().timestamp()
        h = self.history

        def series(group: str, metric: str, names: list[str]) -> list[Any]:
            out = []
            for name in names:
                ring = h.get(group, name, metric)
                if ring is not None:
                    out.append((self._label(group, name), ring.times(), ring.values()))
            return out

        services = h.names("service")
        live = [w.id for w in self.pool_workers if w.status.value in ("online", "draining")]
        plot = self._plot
        plot("#plot-rps").show(series("service", "rps", services), now_t)
        plot("#plot-latency").show(series("service", "p95", services), now_t)
        plot("#plot-errors").show(series("service", "eps", services), now_t)
        plot("#plot-cpu").show(series("worker", "cpu", live), now_t, y_max=100)
        plot("#plot-gpu").show(series("worker", "gpu", live), now_t, y_max=100)
        plot("#plot-inflight").show(series("worker", "inflight", live), now_t)

    def _plot(self, selector: str) -> MetricPlot:
        return self.main.query_one(selector, MetricPlot)

    def _label(self, group: str, name: str) -> str:
        if group == "worker":
            for w in self.pool_workers:
                if w.id == name:
                    return w.name
        return name

    def _draw_events(self) -> None:
        table = self.main.query_one("#events-table", DataTable)
        now = self.clock()
        table.clear()
        for e in reversed(self.events):
            table.add_row(
                Text(view.clock_time(e.ts, now), "dim"),
                Text(e.kind, EVENT_STYLE.get(e.kind, "")),
                Text(e.message),
                key=str(e.id),
            )

    def _draw_tokens(self) -> None:
        table = self.main.query_one("#tokens-table", DataTable)
        tz = self.clock().tzinfo
        selected = _cursor_key(table)
        table.clear()
        for t in self.tokens:
            table.add_row(
                Text(t.id),
                Text(t.label or "-"),
                Text(t.status, view.TOKEN_STYLE.get(t.status, "")),
                Text(f"{t.used}/{'∞' if t.uses is None else t.uses}"),
                Text(f"{t.expires_at.astimezone(tz):%Y-%m-%d %H:%M}", "dim"),
                key=t.id,
            )
        ids = [t.id for t in self.tokens]
        if selected in ids:
            table.move_cursor(row=ids.index(selected), animate=False)

    # --- interaction ------------------------------------------------------------------------------

    def on_resize(self) -> None:
        if self.stats is not None and self.drawable:
            self._draw_workers()
            self._draw_pool()
            self._draw_services()
            self._draw_credits()
            self._draw_detail()

    @on(DataTable.RowHighlighted, "#workers-table")
    def _worker_highlighted(self, event: DataTable.RowHighlighted) -> None:
        key = event.row_key.value
        if key is not None and key != self.selected_id:
            self.selected_id = key
            self._draw_detail()

    @on(DataTable.HeaderSelected, "#workers-table")
    def _header_clicked(self, event: DataTable.HeaderSelected) -> None:
        key = str(event.column_key.value)
        if key == self.sort_key:
            self.sort_reverse = not self.sort_reverse
        else:
            self.sort_key, self.sort_reverse = key, False
        self._draw_workers()

    @on(Input.Changed, "#filter")
    def _filter_changed(self, event: Input.Changed) -> None:
        self.filter_text = event.value
        self._draw_workers()
        self._draw_detail()

    @on(Input.Submitted, "#filter")
    def _filter_done(self) -> None:
        self.main.query_one("#workers-table").focus()

    def action_tab(self, tab: str) -> None:
        tabs = self.main.query_one(TabbedContent)
        tabs.active = tab
        target = {
            "workers": "#workers-table",
            "pool": "#services-table",
            "events": "#events-table",
            "tokens": "#tokens-table",
            "services": "#scheduler-table",
            "credits": "#credits-table",
        }.get(tab)
        # Focus moves with the tab, or Textual would switch back to the pane holding the focus.
        if target is None:
            tabs.query_one(Tabs).focus()
        else:
            self.main.query_one(target).focus()

    def action_filter(self) -> None:
        self.action_tab("workers")
        self.main.query_one("#filter", Input).focus()

    def action_clear_filter(self) -> None:
        filt = self.main.query_one("#filter", Input)
        filt.value = ""
        self.main.query_one("#workers-table").focus()

    def action_sort(self) -> None:
        keys = view.SORT_KEYS
        self.sort_key = keys[(keys.index(self.sort_key) + 1) % len(keys)]
        self.sort_reverse = False
        self._draw_workers()

    def action_sort_reverse(self) -> None:
        self.sort_reverse = not self.sort_reverse
        self._draw_workers()

    def action_toggle_all(self) -> None:
        self.show_all = not self.show_all
        self._draw_workers()
        self.notify("showing every worker" if self.show_all else "hiding left and removed")

    def action_help(self) -> None:
        self.push_screen(HelpScreen(self.KEYS))

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        tab = self.main.query_one(TabbedContent).active if self._top_ready else "workers"
        if action in (
            "drain",
            "undrain",
            "remove",
            "quarantine",
            "sort",
            "sort_reverse",
            "toggle_all",
        ):
            return tab == "workers"
        if action == "revoke":
            return tab == "tokens"
        return True

    @on(TabbedContent.TabActivated)
    def _tab_changed(self, event: TabbedContent.TabActivated) -> None:
        self.refresh_bindings()
        if event.pane.id == "credits":  # the ledger is read only while it is shown
            self._wake.set()

    # --- actions that change the pool ---------------------------------------------------------

    def action_drain(self) -> None:
        self._confirm_worker_action("drain", "Drain {name}? It gets no new requests.")

    def action_undrain(self) -> None:
        self._confirm_worker_action("undrain", "Undrain {name}? It takes requests again.")

    def action_remove(self) -> None:
        self._confirm_worker_action(
            "remove",
            "Remove {name} from the pool? Its credential stops working.",
            danger=True,
        )

    def action_quarantine(self) -> None:
        """Quarantine the selected worker, or let a quarantined one take client traffic again."""
        w = self.selected_worker()
        if w is not None and w.quarantined:
            self._confirm_worker_action(
                "unquarantine",
                "Unquarantine {name}? It takes client traffic again; its verification record "
                "starts afresh.",
            )
        else:
            self._confirm_worker_action(
                "quarantine",
                "Quarantine {name}? It gets no client traffic (it keeps heartbeating).",
                danger=True,
            )

    def _confirm_worker_action(self, action: str, question: str, *, danger: bool = False) -> None:
        w = self.selected_worker()
        if w is None:
            self.notify("select a worker first", severity="warning")
            return
        detail = f"{w.id}, now {w.status.value}"

        def answered(yes: bool | None) -> None:
            if yes:
                self.run_worker_action(action, w.id, w.name)

        self.push_screen(
            ConfirmScreen(question.format(name=w.name), detail, danger=danger), answered
        )

    @work(group="actions")
    async def run_worker_action(self, action: str, worker_id: str, name: str) -> None:
        client = self.client
        if client is None:
            return
        try:
            result: WorkerPublic = await getattr(client, action)(worker_id)
        except RmaError as exc:
            self.notify(exc.message, title=f"{action} failed", severity="error")
            return
        if action in ("quarantine", "unquarantine"):
            state = "quarantined" if result.quarantined else "out of quarantine"
            self.notify(f"{result.name} is {state}", title=action)
        else:
            self.notify(f"{result.name} is now {result.status.value}", title=action)
        self._wake.set()

    def action_revoke(self) -> None:
        table = self.main.query_one("#tokens-table", DataTable)
        token_id = _cursor_key(table)
        if token_id is None:
            self.notify("select a join token first", severity="warning")
            return
        token = next((t for t in self.tokens if t.id == token_id), None)
        label = f" ({token.label})" if token and token.label else ""

        def answered(yes: bool | None) -> None:
            if yes:
                self.run_revoke(token_id)

        self.push_screen(
            ConfirmScreen(
                f"Revoke join token {token_id}{label}?",
                "No more workers can join with it.",
                danger=True,
            ),
            answered,
        )

    @work(group="actions")
    async def run_revoke(self, token_id: str) -> None:
        client = self.client
        if client is None:
            return
        try:
            token = await client.revoke_token(token_id)
        except RmaError as exc:
            self.notify(exc.message, title="revoke failed", severity="error")
            return
        self.notify(f"join token {token.id} is {token.status}", title="revoked")
        self._wake.set()


def _pct(value: float | None) -> Text:
    return Text(view.percent(value), view.load_style(value))


def _err_style(value: float | None) -> str:
    return "red" if value else ""


def _arrow(key: str, sort_key: str, reverse: bool) -> str:
    if key != sort_key:
        return ""
    return " ▼" if reverse else " ▲"


async def _credits(client: CoordinatorClient) -> list[CreditBalance] | None:
    """The owners' credits; None from a coordinator without a ledger (404)."""
    try:
        return await client.credits("owner")
    except RmaError as exc:
        if exc.status == 404:
            return None
        raise


async def _services(client: CoordinatorClient) -> list[dict[str, Any]] | None:
    """The scheduler's services; None from a coordinator that predates the route (404)."""
    try:
        return await client.services()
    except RmaError as exc:
        if exc.status == 404:
            return None
        raise


def _services_cell(w: WorkerPublic) -> Text:
    text = Text()
    seen = set()
    for s in w.services:
        seen.add(s.name)
        if text:
            text.append(" ")
        text.append(s.name)
        text.append("✓" if s.healthy else "✗", "green" if s.healthy else "red")
    for name in w.assignments:
        if name not in seen:
            if text:
                text.append(" ")
            text.append(f"{name}…", "dim")
    return text if text else Text("-", "dim")


def _beat_style(w: WorkerPublic, now: datetime) -> str:
    if w.last_heartbeat_at is None or w.status.value in ("left", "removed"):
        return "dim"
    if w.status.value == "offline":
        return "red"
    return "" if (now - w.last_heartbeat_at).total_seconds() < 60 else "yellow"


def _ms(value: Any) -> str:
    return f"{value:.0f}" if isinstance(value, int | float) else "-"


def _cursor_key(table: DataTable[Any]) -> str | None:
    if table.row_count == 0:
        return None
    try:
        key = table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value
    except Exception:
        return None
    return key
