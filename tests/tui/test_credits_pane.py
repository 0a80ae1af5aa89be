"""The Credits tab and the quarantine key over the stub: what is read when, and older
coordinators.  The real path is ``test_live.py::test_credits_tab_and_quarantine_key``."""

from __future__ import annotations

from textual.widgets import DataTable, Static

from rma.client import RmaError
from rma.schemas.api import CreditBalance
from rma.tui.app import TopApp
from rma.tui.panes.credits import amount

from .tui_stub import WORKERS, StubClient, frozen_clock, make_history, settle, settle_credits


def _app(stub: StubClient) -> TopApp:
    return TopApp(lambda: stub, refresh=3600, clock=frozen_clock, history=make_history())  # type: ignore[arg-type, return-value]


class NoLedger(StubClient):
    async def credits(self, by: str = "worker", since: str | None = None) -> list[CreditBalance]:
        raise RmaError("not_found", "Not Found", status=404)


async def test_the_ledger_is_read_only_while_its_tab_is_shown() -> None:
    stub = StubClient()
    app = _app(stub)
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(pilot)
        assert not [c for c in stub.calls if c.startswith("credits")]
        await settle_credits(pilot)
        assert "credits owner" in stub.calls
        rows = app.query_one("#credits-table", DataTable)
        assert [str(k.value) for k in rows.rows] == [
            "owner:alice",
            "owner:",
            "owner:ana",
            "owner:bob",
        ]  # most credits first
        bob = [str(getattr(c, "plain", c)) for c in rows.get_row("owner:bob")]
        assert bob[:3] == ["bob", "1", " 1 "]  # one worker, quarantined
        note = str(app.query_one("#credits-note", Static).content)
        assert "4 owners" in note and "12.4 in escrow" in note


async def test_a_coordinator_without_a_ledger_still_works() -> None:
    app = _app(NoLedger())
    async with app.run_test(size=(80, 24)) as pilot:
        await settle_credits(pilot)
        assert app.connection == "live"
        assert app.query_one("#credits-table", DataTable).row_count == 0
        assert "keeps no credits ledger" in str(app.query_one("#credits-note", Static).content)


async def test_k_asks_then_lets_a_quarantined_worker_back_and_n_changes_nothing() -> None:
    stub = StubClient()
    app = _app(stub)
    liar = next(w for w in WORKERS if w.quarantined)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        assert app.selected_id == liar.id
        await pilot.press("k")
        assert app.screen.__class__.__name__ == "ConfirmScreen"
        await pilot.press("n")
        await pilot.pause()
        assert not [c for c in stub.calls if "quarantine" in c]
        await pilot.press("k", "y")
        for _ in range(100):
            if f"unquarantine {liar.id}" in stub.calls:
                break
            await pilot.pause(0.02)
        assert f"unquarantine {liar.id}" in stub.calls
        # an honest worker gets the other question: quarantine
        await pilot.press("down", "k", "y")
        for _ in range(100):
            if any(c.startswith("quarantine ") for c in stub.calls):
                break
            await pilot.pause(0.02)
        assert [c for c in stub.calls if c.startswith("quarantine ")] == [
            f"quarantine {app.selected_id}"
        ]


def test_amounts_are_short() -> None:
    assert [amount(x) for x in (0, 1843.25, 96.5, 12.44, 0.0312)] == [
        "0",
        "1843",
        "96.5",
        "12.4",
        "0.031",
    ]
