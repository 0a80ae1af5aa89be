"""`rma worker top` with Pilot over a data dir: what it shows, and `p`/`r` pause and resume."""

from __future__ import annotations

import json
import time
from pathlib import Path

from textual.widgets import DataTable

from rma.agent.pause import DataDirSource
from rma.agent.state import AgentLock, save_status
from rma.tui.donor import DonorTop


def status_doc(**extra: object) -> dict[str, object]:
    return {
        "name": "gaming-pc",
        "coordinator": "https://pool.example:8420",
        "status": "paused",
        "state": "waiting",
        "pause_reason": "waiting for idle: the machine was used 3 s ago",
        "started_at": time.time() - 3700,
        "served": {"today": 7, "total": 1234, "counted": True},
        "services": [{"name": "llm", "state": "running", "healthy": True, "restarts": 1}],
        **extra,
    }


async def test_shows_the_agent_and_pauses_and_resumes(tmp_path: Path) -> None:
    save_status(tmp_path, status_doc())
    lock = AgentLock(tmp_path)  # an agent holds this data dir
    lock.acquire()
    try:
        app = DonorTop(DataDirSource(tmp_path), refresh=0.2)
        async with app.run_test() as pilot:
            text = str(app.query_one("#summary").render())
            assert "waiting for idle" in text
            assert "7 today, 1234 in total" in text
            assert "uptime: 1h0" in text
            table = app.query_one(DataTable)
            assert table.row_count == 1
            await pilot.press("p")
            pause = json.loads((tmp_path / "pause.json").read_text())
            assert pause["until"] is None and "rma worker top" in pause["reason"]
            await pilot.press("r")
            assert not (tmp_path / "pause.json").exists()
    finally:
        lock.release()


async def test_no_agent_running(tmp_path: Path) -> None:
    save_status(tmp_path, status_doc())
    app = DonorTop(DataDirSource(tmp_path))
    async with app.run_test():
        text = str(app.query_one("#summary").render())
        assert "not running" in text
        assert app.query_one(DataTable).row_count == 0
