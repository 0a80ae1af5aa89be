"""Pilot tests: the real dashboard against a real coordinator process, workers joined over HTTP.

Nothing here is stubbed: the app's own :class:`rma.client.CoordinatorClient` talks to
``rma coordinator serve`` on a loopback port; the workers are this test registering and
heartbeating over HTTP, as an agent would.
"""

from __future__ import annotations

import io
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from rich.console import Console
from textual.widgets import DataTable, Static, TabbedContent

from rma.client import CoordinatorClient
from rma.tui.app import TopApp

from .conftest import Coordinator, start_coordinator

FAST = {
    "RMA_OFFLINE_AFTER": "2",
    "RMA_RESTART_GRACE": "0",
    "RMA_SWEEP_INTERVAL": "0.5",
    "RMA_HEARTBEAT_INTERVAL": "1",
}
CAPS = {"cpu_cores": 4, "memory_mb": 8192, "disk_free_mb": 10000, "os": "linux", "arch": "x86_64"}


def app_for(coord: Coordinator, admin_key: str | None = None, refresh: float = 0.5) -> TopApp:
    key = coord.admin_key if admin_key is None else admin_key
    return TopApp(
        lambda: CoordinatorClient(coord.url, admin_key=key, timeout=5),
        refresh=refresh,
        retry_max=1.0,
    )


async def register(coord: Coordinator, name: str, labels: dict[str, str] | None = None) -> dict:
    async with httpx.AsyncClient(base_url=coord.url, timeout=10) as http:
        r = await http.post(
            "/api/worker/register",
            json={
                "token": coord.token(),
                "name": name,
                "capabilities": CAPS,
                "labels": labels or {},
                "version": "test",
                "transport": "direct",
                "endpoint": "http://127.0.0.1:9",
                "runnable": [],
            },
        )
    assert r.status_code == 201, r.text
    return r.json()


async def heartbeat(coord: Coordinator, credential: str, cpu: float = 25.0) -> dict:
    async with httpx.AsyncClient(base_url=coord.url, timeout=10) as http:
        r = await http.post(
            "/api/worker/heartbeat",
            headers={"authorization": f"Bearer {credential}"},
            json={"load": {"cpu_percent": cpu, "memory_percent": 40.0}, "services": []},
        )
    assert r.status_code == 200, r.text
    return r.json()


def admin_get(coord: Coordinator, path: str) -> Any:
    with coord.admin() as c:
        r = c.get(path)
        r.raise_for_status()
        return r.json()


async def wait_for(pilot: Any, cond: Callable[[], bool], what: str, seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if cond():
            return
        await pilot.pause(0.1)
    raise AssertionError(f"timed out after {seconds}s waiting for {what}")


def table_rows(app: TopApp, table_id: str) -> dict[str, list[str]]:
    """The table's rows as plain text, by row key."""
    table = app.query_one(table_id, DataTable)
    return {
        str(key.value): [str(getattr(c, "plain", c)) for c in table.get_row(key)]
        for key in table.rows
    }


def plain(app: TopApp, selector: str) -> str:
    """What a Static shows, as plain text."""
    console = Console(width=200, file=io.StringIO(), color_system=None)
    with console.capture() as capture:
        console.print(app.query_one(selector, Static).content)
    return capture.get()


def status_text(app: TopApp) -> str:
    return plain(app, "#status")


@pytest.fixture
def fast_coordinator(tmp_path: Path, database_url: str) -> Iterator[Coordinator]:
    """A coordinator that calls a worker offline after 2 s of silence."""
    coord = start_coordinator(tmp_path / "fast", database_url=database_url, env=FAST)
    yield coord
    coord.stop()


async def test_a_joining_worker_appears_live(coordinator_process: Coordinator) -> None:
    app = app_for(coordinator_process, refresh=30)  # slow polls: the event stream must do it
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_for(pilot, lambda: app.connection == "live", "the event stream")
        assert table_rows(app, "#workers-table") == {}

        joined = await register(coordinator_process, "alpha-box", {"zone": "eu"})
        wid = joined["worker_id"]
        await wait_for(pilot, lambda: wid in table_rows(app, "#workers-table"), "alpha-box")
        row = table_rows(app, "#workers-table")[wid]
        assert row[0] == "alpha-box"
        assert row[1] == "online"
        assert row[2] == "service"
        # the join is in the event log and in the worker's detail
        await wait_for(
            pilot,
            lambda: any(r[1] == "joined" for r in table_rows(app, "#events-table").values()),
            "the joined event",
        )
        detail = plain(app, "#detail-body")
        assert "alpha-box" in detail
        assert "zone=eu" in detail


async def test_a_silent_worker_turns_offline(fast_coordinator: Coordinator) -> None:
    app = app_for(fast_coordinator, refresh=0.5)
    async with app.run_test(size=(80, 24)) as pilot:
        quiet = await register(fast_coordinator, "quiet-one")
        chatty = await register(fast_coordinator, "chatty-one")
        await heartbeat(fast_coordinator, quiet["credential"])
        await wait_for(
            pilot,
            lambda: len(table_rows(app, "#workers-table")) == 2,
            "both workers in the table",
        )
        assert table_rows(app, "#workers-table")[quiet["worker_id"]][1] == "online"

        # chatty keeps heartbeating, quiet goes silent
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            await heartbeat(fast_coordinator, chatty["credential"])
            if table_rows(app, "#workers-table")[quiet["worker_id"]][1] == "offline":
                break
            await pilot.pause(0.3)
        rows = table_rows(app, "#workers-table")
        assert rows[quiet["worker_id"]][1] == "offline"
        assert rows[chatty["worker_id"]][1] == "online"
        assert (
            admin_get(fast_coordinator, f"/api/admin/workers/{quiet['worker_id']}")["status"]
            == "offline"
        )
        await wait_for(
            pilot,
            lambda: any(r[1] == "offline" for r in table_rows(app, "#events-table").values()),
            "the offline event",
        )


async def test_drain_undrain_and_cancelled_remove_reach_the_coordinator(
    coordinator_process: Coordinator,
) -> None:
    app = app_for(coordinator_process)
    async with app.run_test(size=(80, 24)) as pilot:
        joined = await register(coordinator_process, "drain-me")
        wid = joined["worker_id"]
        await wait_for(pilot, lambda: wid in table_rows(app, "#workers-table"), "drain-me")
        assert app.selected_id == wid

        await pilot.press("d")
        assert app.screen.__class__.__name__ == "ConfirmScreen"
        await pilot.press("y")
        path = f"/api/admin/workers/{wid}"
        await wait_for(
            pilot, lambda: admin_get(coordinator_process, path)["status"] == "draining", "drain"
        )
        await wait_for(
            pilot,
            lambda: table_rows(app, "#workers-table")[wid][1] == "draining",
            "the table to show draining",
        )

        # saying no to remove changes nothing
        await pilot.press("x")
        assert app.screen.__class__.__name__ == "ConfirmScreen"
        await pilot.press("n")
        await pilot.pause(0.5)
        assert admin_get(coordinator_process, path)["status"] == "draining"

        await pilot.press("u", "y")
        await wait_for(
            pilot, lambda: admin_get(coordinator_process, path)["status"] == "online", "undrain"
        )

        # an action the coordinator refuses shows its message and changes nothing
        await pilot.press("u", "y")
        await wait_for(
            pilot,
            lambda: any("not draining" in str(n.message) for n in app._notifications),
            "the refusal to be shown",
        )
        assert admin_get(coordinator_process, path)["status"] == "online"


async def test_revoke_a_join_token(coordinator_process: Coordinator) -> None:
    coordinator_process.token()
    app = app_for(coordinator_process)
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_for(pilot, lambda: app.loaded.is_set(), "the first poll")
        await pilot.press("5")
        assert app.query_one(TabbedContent).active == "tokens"
        rows = table_rows(app, "#tokens-table")
        assert len(rows) == 1
        token_id = next(iter(rows))
        assert rows[token_id][2] == "active"

        await pilot.press("v", "y")
        await wait_for(
            pilot,
            lambda: table_rows(app, "#tokens-table")[token_id][2] == "revoked",
            "the token to show revoked",
        )
        tokens = admin_get(coordinator_process, "/api/admin/tokens")
        assert [t["status"] for t in tokens if t["id"] == token_id] == ["revoked"]


async def test_a_lost_coordinator_shows_and_reconnects(tmp_path: Path, database_url: str) -> None:
    data = tmp_path / "lost"
    coord = start_coordinator(data, database_url=database_url)
    port = int(coord.url.rsplit(":", 1)[1])
    app = app_for(coord, refresh=0.3)
    try:
        async with app.run_test(size=(80, 24)) as pilot:
            joined = await register(coord, "survivor")
            await wait_for(
                pilot,
                lambda: joined["worker_id"] in table_rows(app, "#workers-table"),
                "the worker",
            )
            coord.stop(signal.SIGKILL)
            await wait_for(pilot, lambda: app.connection == "lost", "the app to notice")
            assert "lost" in status_text(app)
            assert "cannot reach the coordinator" in status_text(app)
            assert app.has_class("-lost")  # the stale tables are dimmed
            await pilot.pause(0.2)
            assert app.main.query_one("#workers-table").styles.text_opacity < 1
            await pilot.pause(1.0)  # a few failed polls later, still running, data still shown
            assert app.is_running
            assert joined["worker_id"] in table_rows(app, "#workers-table")

            coord = start_coordinator(data, port=port, database_url=database_url)
            await wait_for(pilot, lambda: app.connection == "live", "the app to reconnect")
            assert "live" in status_text(app)
            assert not app.has_class("-lost")
            assert joined["worker_id"] in table_rows(app, "#workers-table")
    finally:
        coord.stop()


async def test_a_wrong_admin_key_ends_the_app_with_the_reason(
    coordinator_process: Coordinator,
) -> None:
    app = app_for(coordinator_process, admin_key="rma_admin_wrong")
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_for(pilot, lambda: app.fatal is not None, "the fatal error")
    assert app.fatal is not None
    assert app.fatal.status == 401
    assert app.return_code == 1


async def test_services_tab_shows_the_schedulers_view(fast_coordinator: Coordinator) -> None:
    """Key 6: every catalog service of GET /api/admin/services; llm assigned and healthy."""
    async with httpx.AsyncClient(base_url=fast_coordinator.url, timeout=10) as http:
        r = await http.post(
            "/api/worker/register",
            json={
                "token": fast_coordinator.token(),
                "name": "llm-box",
                "capabilities": CAPS,
                "labels": {},
                "version": "test",
                "transport": "direct",
                "endpoint": "http://127.0.0.1:9",
                "runnable": ["llm"],
            },
        )
        assert r.status_code == 201, r.text
        credential = r.json()["credential"]
    app = app_for(fast_coordinator, refresh=0.5)
    async with app.run_test(size=(160, 48)) as pilot:
        await pilot.press("6")
        assert app.query_one(TabbedContent).active == "services"
        names = {s["name"] for s in admin_get(fast_coordinator, "/api/admin/services")}
        assert "llm" in names
        await wait_for(
            pilot, lambda: set(table_rows(app, "#scheduler-table")) == names, "every service"
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            async with httpx.AsyncClient(base_url=fast_coordinator.url, timeout=10) as http:
                hb = await http.post(
                    "/api/worker/heartbeat",
                    headers={"authorization": f"Bearer {credential}"},
                    json={
                        "load": {"cpu_percent": 10.0, "memory_percent": 20.0},
                        "services": [
                            {"name": "llm", "state": "running", "healthy": True, "inflight": 2}
                        ],
                    },
                )
            assert hb.status_code == 200, hb.text
            row = table_rows(app, "#scheduler-table")["llm"]
            if row[3:5] == ["1", "1"]:
                break
            await pilot.pause(0.3)
        # SERVICE TIER WANTED ASSIGNED HEALTHY IN FLIGHT QUEUED LAST SCALING
        row = table_rows(app, "#scheduler-table")["llm"]
        assert row[3:5] == ["1", "1"], row
        assert row[5] == "2", row
        assert row[7] == "-", row


async def test_credits_tab_and_quarantine_key(tmp_path: Path, database_url: str) -> None:
    """A donor's worker serves real requests through the gateway: the Credits tab shows its
    owner's credits; ``k`` quarantines it (REP says QUAR) and ``k`` again lets it back."""
    from tests.gateway.conftest import make_pool, start_backend

    pool = make_pool(tmp_path / "pool", database_url, env={"RMA_CREDIT_ESCROW_RESULTS": "0"})
    backend = start_backend("donor")
    try:
        wid = pool.add_worker("donor-box", {"fake": backend.url}, owner="alice")
        body = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}
        with pool.client() as c:
            for _ in range(3):
                r = c.post("/v1/chat/completions", json=body)
                assert r.status_code == 200, r.text
        path = f"/api/admin/workers/{wid}"
        app = app_for(pool.coord)
        async with app.run_test(size=(80, 24)) as pilot:
            await wait_for(pilot, lambda: wid in table_rows(app, "#workers-table"), "the worker")
            assert app.selected_id == wid
            # NAME STATUS TIER SERVICES CPU MEM GPU INF REP BEAT
            assert table_rows(app, "#workers-table")[wid][8] == "0.50"
            await pilot.press("k")
            assert app.screen.__class__.__name__ == "ConfirmScreen"
            await pilot.press("y")
            await wait_for(
                pilot, lambda: admin_get(pool.coord, path)["quarantined"], "the quarantine"
            )
            await wait_for(
                pilot, lambda: table_rows(app, "#workers-table")[wid][8] == "QUAR", "QUAR"
            )
            assert "QUARANTINED" in plain(app, "#detail-body")

            await pilot.press("7")

            def alice() -> list[str]:
                return table_rows(app, "#credits-table").get("owner:alice", [])

            # OWNER WORKERS QUAR CREDITS SHARE ESCROW REQUESTS
            await wait_for(pilot, lambda: alice()[6:] == ["3"], "alice's 3 requests")
            assert alice()[:3] == ["alice", "1", " 1 "]
            assert float(alice()[3]) > 0
            assert alice()[4].endswith("100%")

            await pilot.press("1", "k", "y")
            await wait_for(
                pilot, lambda: not admin_get(pool.coord, path)["quarantined"], "unquarantine"
            )
            await wait_for(
                pilot, lambda: table_rows(app, "#workers-table")[wid][8] != "QUAR", "REP again"
            )
            events = [e["kind"] for e in admin_get(pool.coord, "/api/admin/events")]
            assert "quarantined" in events and "unquarantined" in events
    finally:
        backend.kill()
        pool.coord.stop()
