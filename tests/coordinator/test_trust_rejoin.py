"""Silence is not revocation: a worker the sweeper removed re-joins with its secret alone.

Only ``rma admin remove`` revokes; the 401's code tells the two apart (``evicted`` and
``removed``), and so does the worker object (``revoked``).
"""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient

from rma.coordinator.clock import FakeClock

from .conftest import SERVICE_CAPS, Api, Registered


def sweep_until_removed(
    api: Api, clock: FakeClock, quiet: Registered, chatty: list[Registered]
) -> None:
    clock.advance(api.pool.settings.grace)
    for w in chatty:
        api.heartbeat(w)
    for _ in range(int(api.pool.settings.remove_after // 100) + 2):  # the laptop sleeps
        clock.advance(100)
        for w in chatty:
            api.heartbeat(w)
        if api.app.state.sweeper.run_once()["removed"]:
            break
    assert api.worker(quiet.id)["status"] == "removed"


def rejoin(client: TestClient, w: Registered, token: str | None = None) -> object:
    body = {
        "name": "laptop",
        "capabilities": SERVICE_CAPS,
        "worker_id": w.id,
        "worker_secret": w.secret,
    }
    if token:
        body["token"] = token
    return client.post("/api/worker/register", json=body)


def test_a_worker_removed_for_silence_rejoins_without_a_token(api: Api, clock: FakeClock) -> None:
    laptop = api.register("laptop")
    chatty = [api.register(f"desk{i}") for i in range(3)]
    sweep_until_removed(api, clock, laptop, chatty)
    assert api.worker(laptop.id)["revoked"] is False

    r = api.client.post("/api/worker/heartbeat", json={}, headers=laptop.headers)
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "evicted"  # not "removed": the agent re-joins

    back = rejoin(api.client, laptop)
    assert back.status_code == 201, back.text  # type: ignore[attr-defined]
    data = back.json()  # type: ignore[attr-defined]
    assert data["worker_id"] == laptop.id
    assert data["worker_secret"] is None  # the old secret stays valid
    assert api.worker(laptop.id)["status"] == "online"
    rejoined = [e for e in api.events("rejoined") if e["worker_id"] == laptop.id]
    assert len(rejoined) == 1
    hb = api.client.post(
        "/api/worker/heartbeat",
        json={},
        headers={"authorization": f"Bearer {data['credential']}"},
    )
    assert hb.status_code == 200


def test_only_the_operator_revokes(api: Api, clock: FakeClock) -> None:
    w = api.register("w")
    r = api.client.delete(f"/api/admin/workers/{w.id}", headers=api.admin)
    assert r.status_code == 200
    assert r.json()["revoked"] is True
    hb = api.client.post("/api/worker/heartbeat", json={}, headers=w.headers)
    assert hb.status_code == 401
    assert hb.json()["error"]["code"] == "removed"
    assert "rma admin remove" in hb.json()["error"]["message"]
    again = rejoin(api.client, w)
    assert again.status_code == 401  # type: ignore[attr-defined]
    assert again.json()["error"]["code"] == "removed"  # type: ignore[attr-defined]
    ok = rejoin(api.client, w, token=api.token())
    assert ok.status_code == 201  # type: ignore[attr-defined]
    assert api.worker(w.id)["revoked"] is False  # the new token was the operator's consent


def test_an_evicted_worker_the_operator_then_removes_is_revoked(api: Api, clock: FakeClock) -> None:
    laptop = api.register("laptop")
    chatty = [api.register(f"desk{i}") for i in range(3)]
    sweep_until_removed(api, clock, laptop, chatty)
    r = api.client.delete(f"/api/admin/workers/{laptop.id}", headers=api.admin)
    assert r.status_code == 200
    assert r.json()["revoked"] is True
    assert (
        api.client.delete(f"/api/admin/workers/{laptop.id}", headers=api.admin).status_code == 409
    )
    again = rejoin(api.client, laptop)
    assert again.status_code == 401  # type: ignore[attr-defined]
    assert again.json()["error"]["code"] == "removed"  # type: ignore[attr-defined]


def test_migration_0003_counts_workers_removed_before_as_revoked(
    tmp_path: Path, database_url: str
) -> None:
    """Who removed a worker before the flag existed is unknown: it stays out without a token."""
    from importlib import resources

    from alembic import command
    from alembic.config import Config
    from sqlalchemy import text

    from rma.coordinator.db import make_engine

    (tmp_path / "data").mkdir(exist_ok=True)
    engine = make_engine(database_url)
    try:
        cfg = Config()
        where = resources.files("rma.coordinator") / "migrations"
        cfg.set_main_option("script_location", str(where))
        with engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "0002")
        columns = "id, name, status, tier, capabilities, labels, services, assignments, load, "
        columns += "transport, trusted, version, registered_at, status_changed_at, secret_hash"
        with engine.begin() as conn:
            for ident, status in (("gone", "removed"), ("here", "online")):
                conn.execute(
                    text(
                        f"INSERT INTO worker ({columns}, drained) VALUES (:id, :id, :status, 2, "
                        "'{}', '{}', '[]', '[]', '{}', 'tunnel', false, '', 0, 0, '', false)"
                    ),
                    {"id": ident, "status": status},
                )
        with engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")
        with engine.connect() as conn:
            rows = dict(conn.execute(text("SELECT id, revoked FROM worker")).all())
        assert rows == {"gone": True, "here": False}
    finally:
        engine.dispose()
