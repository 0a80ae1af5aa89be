"""The sweeper, with a controllable clock: offline, removed, restart grace, self-suspicion."""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient

from rma.coordinator.app import create_app
from rma.coordinator.clock import FakeClock
from rma.settings import CoordinatorSettings

from .conftest import SERVICE_CAPS, Api


def sweep(api: Api) -> dict[str, list[str]]:
    result: dict[str, list[str]] = api.app.state.sweeper.run_once()
    return result


def past_grace(api: Api, clock: FakeClock) -> None:
    """Move past the restart grace (one offline window after the start), keeping workers fresh."""
    clock.advance(api.pool.settings.grace)


def test_silent_worker_goes_offline_after_120s_and_removed_after_600s(
    api: Api, clock: FakeClock
) -> None:
    past_grace(api, clock)
    quiet = api.register("quiet")
    chatty = [api.register(f"chatty{i}") for i in range(3)]  # most of the pool stays in touch

    def beat() -> None:
        for w in chatty:
            api.heartbeat(w)

    clock.advance(119)
    beat()
    assert sweep(api) == {"offline": [], "removed": []}
    clock.advance(1)
    beat()
    assert sweep(api) == {"offline": [quiet.id], "removed": []}
    assert api.worker(quiet.id)["status"] == "offline"
    assert not api.pool.registry.get(quiet.id).serves("llm")
    assert "no heartbeat for 120 s" in api.events("offline")[-1]["message"]
    assert sweep(api) == {"offline": [], "removed": []}  # nothing twice
    clock.advance(479)
    beat()
    assert sweep(api)["removed"] == []
    clock.advance(1)
    beat()
    assert sweep(api) == {"offline": [], "removed": [quiet.id]}
    assert api.worker(quiet.id)["status"] == "removed"
    r = api.client.post("/api/worker/heartbeat", json={}, headers=quiet.headers)
    assert r.status_code == 401  # its credential no longer opens anything
    assert [w["status"] for w in api.workers() if w["id"] != quiet.id] == ["online"] * 3


def test_offline_worker_comes_back_with_a_heartbeat(api: Api, clock: FakeClock) -> None:
    past_grace(api, clock)
    w = api.register("flaky")
    clock.advance(130)
    assert sweep(api)["offline"] == [w.id]
    body = api.heartbeat(w)
    assert body["status"] == "online"
    assert api.worker(w.id)["status"] == "online"
    placing = ("assigned", "unassigned")
    kinds = [e["kind"] for e in api.events() if e["worker_id"] == w.id and e["kind"] not in placing]
    assert kinds[-2:] == ["offline", "online"]


def test_liveness_windows_are_settings(tmp_path: Path, database_url: str) -> None:
    clock = FakeClock()
    settings = CoordinatorSettings(
        data_dir=tmp_path / "d", database_url=database_url, offline_after=5, remove_after=10
    )
    app = create_app(settings, clock=clock, run_sweeper=False)
    with TestClient(app) as client:
        api = Api(client, app, (settings.data_dir / "admin.key").read_text().strip())
        clock.advance(5)
        w = api.register("w")
        clock.advance(5)
        assert sweep(api)["offline"] == [w.id]
        clock.advance(5)
        assert sweep(api)["removed"] == [w.id]
    app.state.pool.engine.dispose()


def test_restart_grace_judges_nobody_for_one_window(
    tmp_path: Path, database_url: str, clock: FakeClock
) -> None:
    settings = CoordinatorSettings(data_dir=tmp_path / "d", database_url=database_url)
    app = create_app(settings, clock=clock, run_sweeper=False)
    with TestClient(app) as client:
        api = Api(client, app, (settings.data_dir / "admin.key").read_text().strip())
        clock.advance(200)
        workers = [api.register(f"w{i}") for i in range(3)]
    app.state.pool.engine.dispose()

    clock.advance(3600)  # the coordinator was down for an hour: every worker looks silent
    app2 = create_app(settings, clock=clock, run_sweeper=False)
    with TestClient(app2) as client:
        api2 = Api(client, app2, api.admin_key)
        ids = [w.id for w in workers]
        assert {w["id"]: w["status"] for w in api2.workers()} == dict.fromkeys(ids, "online")
        clock.advance(119)
        assert sweep(api2) == {"offline": [], "removed": []}
        # two workers find the coordinator again within the window (their credentials expired
        # meanwhile: they re-join with worker_id + worker_secret); one never does
        for w in workers[:2]:
            body = {
                "name": "back",
                "capabilities": SERVICE_CAPS,
                "worker_id": w.id,
                "worker_secret": w.secret,
            }
            r = client.post("/api/worker/register", json=body)
            assert r.status_code == 201
            assert r.json()["worker_id"] == w.id
        clock.advance(1)
        assert sweep(api2)["offline"] == [ids[2]]
        assert api2.worker(ids[0])["status"] == "online"
    app2.state.pool.engine.dispose()


def test_most_workers_silent_at_once_removes_nobody_and_says_so(api: Api, clock: FakeClock) -> None:
    past_grace(api, clock)
    workers = [api.register(f"w{i}") for i in range(4)]
    survivor = workers[0]
    clock.advance(30)
    api.heartbeat(survivor)
    clock.advance(700)  # 3 of 4 silent together for longer than remove_after
    api.heartbeat(survivor)
    result = sweep(api)
    assert sorted(result["offline"]) == sorted(w.id for w in workers[1:])
    assert result["removed"] == []
    suspects = api.events("suspect")
    assert len(suspects) == 1
    assert "3 of 4 workers went silent at once" in suspects[0]["message"]
    clock.advance(60)
    api.heartbeat(survivor)
    assert sweep(api) == {"offline": [], "removed": []}
    assert len(api.events("suspect")) == 1  # said once per episode
    # they come back: suspicion ends, nobody was lost
    for w in workers[1:]:
        api.heartbeat(w)
    sweep(api)
    assert len(api.events("suspect_cleared")) == 1
    assert {w["status"] for w in api.workers()} == {"online"}


def test_workers_back_a_little_after_the_majority_are_not_removed(
    api: Api, clock: FakeClock
) -> None:
    """The suspicion ends when most are back; the rest (their next heartbeat is a little later)
    get one more window from then, not a removal for a silence that was the coordinator's."""
    past_grace(api, clock)
    workers = [api.register(f"w{i}") for i in range(4)]
    clock.advance(700)  # everyone silent together, past remove_after
    assert sweep(api)["removed"] == []
    for w in workers[:3]:  # three come back: the suspicion ends
        api.heartbeat(w)
    assert sweep(api)["removed"] == []
    assert len(api.events("suspect_cleared")) == 1
    clock.advance(30)
    assert sweep(api)["removed"] == []  # the straggler is still offline, not removed
    api.heartbeat(workers[3])
    assert {w["status"] for w in api.workers()} == {"online"}


def test_workers_dying_one_by_one_are_still_removed(api: Api, clock: FakeClock) -> None:
    """Silence spread over time is not "at once": no suspicion, removals go ahead."""
    past_grace(api, clock)
    workers = [api.register(f"w{i}") for i in range(3)]
    alive = workers[0]
    # w1 dies now, w2 dies 300 s later; the pool is 2/3 silent but not at once
    for _ in range(10):
        clock.advance(30)
        api.heartbeat(alive)
        api.heartbeat(workers[2])
    for _ in range(19):
        clock.advance(30)
        api.heartbeat(alive)
        sweep(api)
    assert api.events("suspect") == []
    statuses = {w["id"]: w["status"] for w in api.workers()}
    assert statuses[workers[1].id] == "removed"
    assert statuses[workers[2].id] == "offline"  # silent 570 s: not yet removed
    assert statuses[alive.id] == "online"


def test_left_and_removed_workers_are_not_swept(api: Api, clock: FakeClock) -> None:
    past_grace(api, clock)
    gone = api.register("gone")
    api.client.post("/api/worker/leave", headers=gone.headers)
    clock.advance(10_000)
    assert sweep(api) == {"offline": [], "removed": []}
    assert api.worker(gone.id)["status"] == "left"


def test_sweeper_runs_in_the_background_when_enabled(tmp_path: Path, database_url: str) -> None:
    import time

    settings = CoordinatorSettings(
        data_dir=tmp_path / "d",
        database_url=database_url,
        offline_after=0.3,
        remove_after=60,
        restart_grace=0,
        sweep_interval=0.05,
    )
    app = create_app(settings)
    with TestClient(app) as client:
        api = Api(client, app, (settings.data_dir / "admin.key").read_text().strip())
        w = api.register("w")
        deadline = time.monotonic() + 10
        while api.worker(w.id)["status"] != "offline":
            assert time.monotonic() < deadline, "the background sweeper never ran"
            time.sleep(0.05)
    app.state.pool.engine.dispose()


def test_operator_drain_survives_going_offline_and_back(api: Api, clock: FakeClock) -> None:
    past_grace(api, clock)
    w = api.register("drained")
    r = api.client.post(f"/api/admin/workers/{w.id}/drain", headers=api.admin)
    assert r.status_code == 200 and r.json()["status"] == "draining"
    clock.advance(130)
    assert sweep(api)["offline"] == [w.id]
    assert api.heartbeat(w)["status"] == "draining"  # back, but still drained: no traffic
    assert api.worker(w.id)["status"] == "draining"
    r = api.client.post(f"/api/admin/workers/{w.id}/undrain", headers=api.admin)
    assert r.status_code == 200 and r.json()["status"] == "online"
    assert api.heartbeat(w)["status"] == "online"


def test_draining_an_offline_worker_keeps_it_offline_until_it_returns(
    api: Api, clock: FakeClock
) -> None:
    past_grace(api, clock)
    w = api.register("away")
    clock.advance(130)
    assert sweep(api)["offline"] == [w.id]
    r = api.client.post(f"/api/admin/workers/{w.id}/drain", headers=api.admin)
    assert r.status_code == 200 and r.json()["status"] == "offline"
    assert api.heartbeat(w)["status"] == "draining"


def test_old_events_and_usage_are_pruned(api: Api, clock: FakeClock) -> None:
    from rma.coordinator.db import session
    from rma.coordinator.tables import Usage

    pool = api.pool
    pool.events.emit("test", "old event")
    with session(pool.engine) as s:
        s.add(Usage(ts=clock.time(), service="llm", status=200, latency_ms=1.0))
    clock.advance(pool.settings.usage_retention + 1)
    pool.events.emit("test", "recent event")
    assert api.app.state.sweeper.prune() == {"events": 0, "usage": 1}
    clock.advance(pool.settings.event_retention)
    assert api.app.state.sweeper.prune()["events"] >= 1  # the old one (and bootstrap's)
    messages = [e["message"] for e in api.events("test")]
    assert messages == ["recent event"]
