"""The Credits tab: the ledger per owner (``GET /api/admin/credits?by=owner``).

Per owner (the donor a worker joined for, ``rma worker join --owner``): its workers, the credits
they earned, their share of all credits, what is still held in escrow, and the requests served;
as ``rma admin credits --by owner`` prints it.  The dashboard reads the ledger only while this
tab is shown.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import DataTable, Static

from rma.schemas.api import CreditBalance, WorkerPublic
from rma.tui import view
from rma.tui.widgets import fit, set_columns

Columns = list[tuple[str, str, int | None]]

WIDE_COLUMNS: Columns = [
    ("owner", "OWNER", None),
    ("workers", "WORKERS", None),
    ("quarantined", "QUARANTINED", None),
    ("credits", "CREDITS", None),
    ("share", "SHARE", None),
    ("escrow", "ESCROW", None),
    ("requests", "REQUESTS", None),
]
NARROW_COLUMNS: Columns = [
    ("owner", "OWNER", 14),
    ("workers", "WORKERS", 7),
    ("quarantined", "QUAR", 4),
    ("credits", "CREDITS", 9),
    ("share", "SHARE", 14),
    ("escrow", "ESCROW", 8),
    ("requests", "REQUESTS", 8),
]
NOTE = (
    "credits: service-seconds x the service's credit_weight, all time; escrow: earned by "
    "workers not established yet (released once they are, forfeited on quarantine)"
)


def amount(value: float) -> str:
    """``1843``, ``12.4``, ``0.031``: three significant figures at most, no exponent."""
    if value == 0:
        return "0"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 1:
        return f"{value:.1f}"
    return f"{value:.3f}"


def workers_by_owner(workers: Sequence[WorkerPublic]) -> tuple[Counter[str], Counter[str]]:
    """(workers in the pool, quarantined ones) per owner: ``owner``, else the ``owner`` label."""
    present: Counter[str] = Counter()
    quarantined: Counter[str] = Counter()
    for w in workers:
        if w.status.value == "removed":
            continue
        owner = w.owner or w.labels.get("owner", "")
        present[owner] += 1
        quarantined[owner] += w.quarantined
    return present, quarantined


def cells(
    row: CreditBalance, total: float, present: Counter[str], quarantined: Counter[str]
) -> dict[str, Text]:
    """One owner's cells, by column key (``total``: every owner's credits)."""
    owner = row.owner
    q = quarantined.get(owner, 0)
    share = row.credits / total * 100 if total > 0 else 0.0
    return {
        "owner": Text(row.name or "(no owner)", "bold" if owner else "bright_black"),
        "workers": Text(str(present.get(owner, 0))),
        "quarantined": Text(f" {q} ", "bold white on red") if q else Text("-", "bright_black"),
        "credits": Text(amount(row.credits), "green" if row.credits > 0 else ""),
        "share": Text(f"{view.bar(share, 8)} {share:.0f}%", "cyan"),
        "escrow": Text(amount(row.escrow), "yellow" if row.escrow > 0 else ""),
        "requests": Text(str(row.requests)),
    }


class CreditsPane(Vertical):
    """The owners' credits, most first, with a note on what the numbers are."""

    def compose(self) -> ComposeResult:
        yield DataTable(id="credits-table", cursor_type="row", zebra_stripes=True)
        yield Static(id="credits-note")

    def show(
        self,
        rows: list[CreditBalance] | None,
        workers: Sequence[WorkerPublic],
        *,
        loaded: bool,
        narrow: bool,
    ) -> None:
        """Draw ``rows`` (None: not read yet, or this coordinator keeps no ledger)."""
        table: DataTable[Any] = self.query_one("#credits-table", DataTable)
        spec = NARROW_COLUMNS if narrow else WIDE_COLUMNS
        set_columns(table, spec)
        selected = table.cursor_row if table.row_count else None
        table.clear()
        ordered = sorted(rows or [], key=lambda r: (-r.credits, -r.escrow, r.name))
        total = sum(max(r.credits, 0.0) for r in ordered)
        present, quarantined = workers_by_owner(workers)
        for row in ordered:
            by_key = cells(row, total, present, quarantined)
            table.add_row(
                *(fit(by_key[k], width) for k, _, width in spec), key=f"owner:{row.owner}"
            )
        if selected is not None and table.row_count:
            table.move_cursor(row=min(selected, table.row_count - 1), animate=False, scroll=False)
        note = self.query_one("#credits-note", Static)
        if not loaded:
            note.update(Text("reading the ledger…", "bright_black"))
        elif rows is None:
            note.update(Text("this coordinator keeps no credits ledger", "bright_black"))
        elif not rows:
            note.update(Text("no credits yet: they are earned by serving requests", "bright_black"))
        else:
            escrow = sum(r.escrow for r in ordered)
            served = sum(r.requests for r in ordered)
            note.update(
                Text(
                    f"{len(ordered)} owners · {amount(total)} credits · {amount(escrow)} in "
                    f"escrow · {served} requests\n{NOTE}",
                    "bright_black",
                )
            )
