"""``rma worker top``: a small live view of this machine's agent, for donors who like to watch.

It shows, every second, what the agent writes in its data dir (``worker-status.json``): the
state (serving, paused and why, waiting for idle), the services, the requests served today and in
total, the uptime.  ``p`` pauses (``rma worker pause``), ``r`` resumes, ``q`` quits.  The app
reads and acts through a :class:`DonorSource` (the CLI gives it the agent's data dir), so the TUI
never imports the agent.
"""

from __future__ import annotations

import time
from typing import Any, ClassVar, Protocol

from textual.app import App, ComposeResult
from textual.binding import Binding, BindingType
from textual.widgets import DataTable, Footer, Header, Static


class DonorSource(Protocol):
    def status(self) -> tuple[dict[str, Any] | None, bool]:
        """The agent's last status document (or ``None``) and whether the agent runs."""

    def pause(self) -> None: ...

    def resume(self) -> bool:
        """``True`` when it was paused by the donor."""


def format_duration(seconds: float) -> str:
    s = round(seconds)
    if s >= 3600:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


STATE_WORDS = {
    "serving": "[green]serving[/green]",
    "paused": "[cyan]paused[/cyan]",
    "waiting": "[yellow]waiting[/yellow]",
    "stopped": "[dim]not running[/dim]",
}


def summary(doc: dict[str, Any] | None, running: bool) -> str:
    """The text above the services table."""
    if doc is None:
        return "no agent has run with this data dir (start one with `rma worker join`)"
    state = doc.get("state") if running else "stopped"
    line = STATE_WORDS.get(str(state), str(state))
    if running and doc.get("pause_reason"):
        line += f": {doc['pause_reason']}"
    served = doc.get("served") or {}
    uptime = format_duration(time.time() - float(doc["started_at"])) if running else "-"
    return (
        f"{doc.get('name')} in {doc.get('coordinator')}  ({doc.get('status') or '-'})\n"
        f"state: {line}\n"
        f"served: {served.get('today', 0)} today, {served.get('total', 0)} in total   "
        f"uptime: {uptime}"
    )


class DonorTop(App[None]):
    TITLE = "rma worker top"
    CSS = "#summary { padding: 1 2; height: auto; } DataTable { height: 1fr; }"
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("p", "pause", "Pause"),
        Binding("r", "resume", "Resume"),
        Binding("q", "quit", "Quit"),
    ]

    def __init__(self, source: DonorSource, refresh: float = 1.0) -> None:
        super().__init__()
        self.source = source
        self.refresh_every = refresh

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static(id="summary")
        yield DataTable(id="services", cursor_type="row")
        yield Footer()

    def on_mount(self) -> None:
        table = self.query_one(DataTable)
        table.add_columns("SERVICE", "STATE", "HEALTHY", "RESTARTS", "MESSAGE")
        self.update_view()
        self.set_interval(self.refresh_every, self.update_view)

    def update_view(self) -> None:
        doc, running = self.source.status()
        self.query_one("#summary", Static).update(summary(doc, running))
        table = self.query_one(DataTable)
        table.clear()
        for s in (doc or {}).get("services", []) if running else []:
            table.add_row(
                s["name"],
                s["state"],
                "yes" if s.get("healthy") else "no",
                str(s.get("restarts", 0)),
                (s.get("message") or "")[:80],
            )

    def action_pause(self) -> None:
        self.source.pause()
        self.notify("paused: the agent finishes what is in flight, then stops its services")

    def action_resume(self) -> None:
        if self.source.resume():
            self.notify("resumed: the agent starts its services again")
        else:
            self.notify("it was not paused by the donor")
