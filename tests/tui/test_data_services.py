"""The dashboard's data services against a real coordinator process: a worker that holds
PostgreSQL (it registers, heartbeats it healthy and uploads a backup over HTTP, as an agent
does) shows as its holder with the backup's age and size; Redis, which no worker offers and
which has no backup, is not listed at all (neither on the Services tab nor on the Pool tab).
"""

from __future__ import annotations

import re
import time
from typing import Any

import httpx

from .conftest import Coordinator
from .test_live import CAPS, app_for, plain, table_rows, wait_for

BACKUP = b"-- a pg_dumpall of the pool's database\n" * 200  # 7,800 bytes: "7.6 KB"


async def hold_postgres(coord: Coordinator) -> str:
    """A worker that may run only postgres, reporting it healthy, with one backup uploaded;
    returns its credential."""
    async with httpx.AsyncClient(base_url=coord.url, timeout=10) as http:
        r = await http.post(
            "/api/worker/register",
            json={
                "token": coord.token(),
                "name": "nas",
                "capabilities": CAPS,
                "labels": {},
                "version": "test",
                "transport": "direct",
                "endpoint": "http://127.0.0.1:9",
                "runnable": ["postgres"],
            },
        )
        assert r.status_code == 201, r.text
        body = r.json()
        assert [s["name"] for s in body["assignments"]] == ["postgres"]
        credential = str(body["credential"])
        await beat(http, credential)
        up = await http.put(
            "/api/worker/backups/postgres",
            content=BACKUP,
            headers={"authorization": f"Bearer {credential}"},
        )
        assert up.status_code == 201, up.text
    return credential


async def beat(http: httpx.AsyncClient, credential: str) -> None:
    r = await http.post(
        "/api/worker/heartbeat",
        headers={"authorization": f"Bearer {credential}"},
        json={
            "load": {"cpu_percent": 10.0, "memory_percent": 20.0},
            "services": [
                {
                    "name": "postgres",
                    "state": "running",
                    "healthy": True,
                    "endpoint": "http://127.0.0.1:5999",
                }
            ],
        },
    )
    assert r.status_code == 200, r.text


def services(coord: Coordinator, **params: Any) -> dict[str, dict[str, Any]]:
    with coord.admin() as c:
        r = c.get("/api/admin/services", params=params)
        r.raise_for_status()
        return {row["name"]: row for row in r.json()}


async def test_a_data_service_shows_its_holder_and_last_backup(
    coordinator_process: Coordinator,
) -> None:
    coord = coordinator_process
    credential = await hold_postgres(coord)
    listed = services(coord)
    assert listed["postgres"]["holder"] == "nas"
    assert listed["postgres"]["last_backup"]["size"] == len(BACKUP)
    assert "redis" not in listed  # nobody offers it, no backup: not wanted here
    assert "holder" in services(coord, all="true")["redis"]  # ?all=true lists it anyway

    app = app_for(coord, refresh=0.5)
    async with app.run_test(size=(160, 48)) as pilot:
        await pilot.press("6")
        cols = [c.label.plain for c in app.query_one("#scheduler-table").ordered_columns]  # type: ignore[attr-defined]
        holder, backup, size = (cols.index(k) for k in ("HOLDER", "BACKUP", "SIZE"))

        def shown() -> bool:
            row = table_rows(app, "#scheduler-table").get("postgres")
            return row is not None and row[holder] == "nas"

        deadline = time.monotonic() + 30
        while not shown() and time.monotonic() < deadline:  # keep nas online meanwhile
            async with httpx.AsyncClient(base_url=coord.url, timeout=10) as http:
                await beat(http, credential)
            await pilot.pause(0.3)
        rows = table_rows(app, "#scheduler-table")
        assert rows["postgres"][holder] == "nas", rows
        assert re.fullmatch(r"\d+s|\d+m", rows["postgres"][backup]), rows["postgres"]
        assert rows["postgres"][size] == "7.6 KB"
        assert rows["llm"][holder] == "-"  # not a data service
        assert "redis" not in rows  # not wanted: not listed as down

        await pilot.press("2")  # the Pool tab agrees: redis is "not placed", not down
        await wait_for(pilot, lambda: "postgres" in table_rows(app, "#services-table"), "pool")
        assert "redis" not in table_rows(app, "#services-table")
        assert "redis" in plain(app, "#unplaced")


async def test_a_backed_up_data_service_without_a_holder_is_listed_down(
    coordinator_process: Coordinator,
) -> None:
    """Data that nobody holds is an outage: listed (no holder, none healthy), not hidden."""
    coord = coordinator_process
    credential = await hold_postgres(coord)
    async with httpx.AsyncClient(base_url=coord.url, timeout=10) as http:
        r = await http.post("/api/worker/leave", headers={"authorization": f"Bearer {credential}"})
        assert r.status_code == 204, r.text
    row = services(coord)["postgres"]  # no worker could run it now, but its backup is kept
    assert row["holder"] is None and row["healthy"] == 0 and row["assigned"] == 0
    assert row["last_backup"]["size"] == len(BACKUP)
    app = app_for(coord, refresh=0.5)
    async with app.run_test(size=(160, 48)) as pilot:
        await pilot.press("6")
        await wait_for(pilot, lambda: "postgres" in table_rows(app, "#scheduler-table"), "row")
        cols = [c.label.plain for c in app.query_one("#scheduler-table").ordered_columns]  # type: ignore[attr-defined]
        assert table_rows(app, "#scheduler-table")["postgres"][cols.index("HOLDER")] == "nobody"
