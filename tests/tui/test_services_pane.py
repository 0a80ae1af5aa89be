"""The Services tab against an older coordinator (no ``/api/admin/services``) and its colours."""

from __future__ import annotations

from typing import Any

from textual.widgets import DataTable, Static

from rma.client import RmaError
from rma.tui.app import TopApp
from rma.tui.panes.services import health_style

from .tui_stub import StubClient, frozen_clock, make_history, settle


class OldCoordinator(StubClient):
    async def services(self) -> list[dict[str, Any]]:
        raise RmaError("not_found", "Not Found", status=404)


async def test_a_coordinator_without_the_route_still_works() -> None:
    stub = OldCoordinator()
    app = TopApp(lambda: stub, refresh=3600, clock=frozen_clock, history=make_history())  # type: ignore[arg-type, return-value]
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(pilot)
        assert app.connection == "live"
        assert app.query_one("#workers-table", DataTable).row_count > 0
        await pilot.press("6")
        assert app.query_one("#scheduler-table", DataTable).row_count == 0
        note = str(app.query_one("#scheduler-note", Static).content)
        assert "does not report its scheduler" in note


def test_health_colours() -> None:
    assert health_style({"wanted": 2, "assigned": 2, "healthy": 2}) == "green"
    assert health_style({"wanted": 2, "assigned": 2, "healthy": 1}) == "yellow"
    assert health_style({"wanted": 1, "assigned": 1, "healthy": 0}) == "red"
    assert health_style({"wanted": 0, "assigned": 0, "healthy": 0}) == "bright_black"
