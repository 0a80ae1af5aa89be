"""The Services tab: the scheduler's view of each catalog service (``GET /api/admin/services``).

Per service: replicas wanted, assigned and healthy, requests in flight and queued at the gateway,
and the last ``scaled_up`` / ``scaled_down`` event, as ``rma admin services`` prints them.  Data
services (postgres, redis) also show their holder, their last backup's age and size and the
``rma connect`` connections open; the coordinator lists one only when the pool wants it (a pool
whose workers offer no database shows none, rather than a row that says it is down).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import DataTable, Static

from rma.tui.view import age
from rma.tui.widgets import fit, set_columns

Columns = list[tuple[str, str, int | None]]

WIDE_COLUMNS: Columns = [
    ("name", "SERVICE", None),
    ("tier", "TIER", None),
    ("wanted", "WANTED", None),
    ("assigned", "ASSIGNED", None),
    ("healthy", "HEALTHY", None),
    ("inflight", "IN FLIGHT", None),
    ("queued", "QUEUED", None),
    ("holder", "HOLDER", None),
    ("backup", "BACKUP", None),
    ("size", "SIZE", None),
    ("conns", "CONN", None),
    ("scaling", "LAST SCALING", None),
]
NARROW_COLUMNS: Columns = [
    ("name", "SERVICE", 10),
    ("wanted", "WANT", 4),
    ("assigned", "ASGN", 4),
    ("healthy", "HLTH", 4),
    ("inflight", "INFL", 4),
    ("queued", "QUEUE", 5),
    ("holder", "HOLDER", 8),
    ("backup", "BKUP", 4),
    ("size", "SIZE", 7),
    ("scaling", "LAST SCALING", 8),
]


def health_style(row: dict[str, Any]) -> str:
    """Green when every wanted replica is healthy, yellow when some are, red when none is."""
    wanted, assigned, healthy = (int(row.get(k) or 0) for k in ("wanted", "assigned", "healthy"))
    if assigned == 0 and wanted == 0:
        return "bright_black"
    if healthy == 0:
        return "red"
    return "green" if healthy >= max(wanted, assigned) else "yellow"


def size_text(n: int) -> str:
    """``48.2 KB``: a backup's size."""
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GB"  # not reached


def data_cells(row: dict[str, Any], now: datetime) -> dict[str, Text]:
    """A data service's holder, last backup (age, size) and connections; ``-`` for others."""
    if "holder" not in row:  # not a data service
        return {k: Text("-", "dim") for k in ("holder", "backup", "size", "conns")}
    holder = row.get("holder")
    backup = row.get("last_backup") or {}
    at = backup.get("at")
    taken: datetime | None = None
    if isinstance(at, str):
        try:
            taken = datetime.fromisoformat(at)
        except ValueError:
            taken = None
    size = backup.get("size")
    conns = int(row.get("connections") or 0)
    return {
        "holder": Text(str(holder), "bold") if holder else Text("nobody", "red"),
        "backup": Text(age(taken, now)) if taken else Text("never", "yellow"),
        "size": Text(size_text(size), justify="right") if isinstance(size, int) else Text("-"),
        "conns": Text(str(conns), "cyan" if conns else "", justify="right"),
    }


def cells(row: dict[str, Any], now: datetime) -> dict[str, Text]:
    """One service's cells, by column key."""
    style = health_style(row)
    queued = int(row.get("queued") or 0)
    inflight = int(row.get("inflight") or 0)
    scaling = row.get("last_scaling_event")
    return {
        "name": Text(str(row.get("name", "?")), "bold"),
        "tier": Text(str(row.get("tier", "-"))),
        "wanted": Text(str(row.get("wanted", 0)), justify="right"),
        "assigned": Text(str(row.get("assigned", 0)), justify="right"),
        "healthy": Text(str(row.get("healthy", 0)), style, justify="right"),
        "inflight": Text(str(inflight), "cyan" if inflight else "", justify="right"),
        "queued": Text(str(queued), "yellow" if queued else "", justify="right"),
        "scaling": Text(str(scaling), "magenta") if scaling else Text("-", "dim"),
        **data_cells(row, now),
    }


class ServicesPane(Vertical):
    """The scheduler's table of services, with a note when the coordinator has none to show."""

    def compose(self) -> ComposeResult:
        yield DataTable(id="scheduler-table", cursor_type="row", zebra_stripes=True)
        yield Static(id="scheduler-note")

    def show(self, rows: list[dict[str, Any]] | None, *, narrow: bool, now: datetime) -> None:
        """Draw `rows` (None: this coordinator has no ``/api/admin/services``); ``now`` for
        the backups' ages."""
        table: DataTable[Any] = self.query_one("#scheduler-table", DataTable)
        spec = NARROW_COLUMNS if narrow else WIDE_COLUMNS
        set_columns(table, spec)
        selected = _cursor_row(table)
        table.clear()
        for row in rows or []:
            by_key = cells(row, now)
            table.add_row(
                *(fit(by_key[key], width) for key, _, width in spec), key=str(row.get("name"))
            )
        if selected is not None and table.row_count:
            table.move_cursor(row=min(selected, table.row_count - 1), animate=False, scroll=False)
        note = self.query_one("#scheduler-note", Static)
        if rows is None:
            note.update(Text("this coordinator does not report its scheduler", "bright_black"))
        elif not rows:
            note.update(Text("the catalog is empty", "bright_black"))
        else:
            scaling = sum(1 for r in rows if r.get("last_scaling_event"))
            note.update(
                Text(
                    f"{len(rows)} services; {scaling} scaled since the coordinator started; "
                    "wanted 0 = on every worker that fits",
                    "bright_black",
                )
            )


def _cursor_row(table: DataTable[Any]) -> int | None:
    return table.cursor_row if table.row_count else None
