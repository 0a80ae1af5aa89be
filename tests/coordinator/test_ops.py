"""``/healthz``, ``/readyz``, ``/metrics`` and ``/api/admin/stats``."""

from __future__ import annotations

import time

from .conftest import Api


def test_health_and_readiness(api: Api) -> None:
    assert api.client.get("/healthz").json() == {"status": "ok"}
    name = api.pool.cluster.name
    deadline = time.monotonic() + 30  # on PostgreSQL it takes the leadership in a moment
    while True:
        body = api.client.get("/readyz").json()
        if body.get("role") == "leader" or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    # the only coordinator leads, and /readyz names it
    assert body == {"status": "ready", "coordinator": name, "leader": name, "role": "leader"}


def test_readyz_is_503_when_the_database_is_gone(api: Api) -> None:
    from sqlalchemy import create_engine

    good = api.pool.engine
    api.pool.engine = create_engine("postgresql+psycopg://nobody@127.0.0.1:1/none")
    try:
        r = api.client.get("/readyz")
        assert r.status_code == 503
        assert r.json()["error"]["code"] == "db_unreachable"
    finally:
        api.pool.engine.dispose()
        api.pool.engine = good


def test_metrics_count_workers_by_status(api: Api) -> None:
    w = api.register("a")
    api.register("b")
    api.client.post(f"/api/admin/workers/{w.id}/drain", headers=api.admin)
    r = api.client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    assert 'rma_workers{status="online"} 1' in r.text
    assert 'rma_workers{status="draining"} 1' in r.text


def test_stats(api: Api) -> None:
    api.register("a", runnable=["ner"])
    s = api.client.get("/api/admin/stats", headers=api.admin).json()
    assert s["workers"]["total"] == 1
    assert s["workers"]["by_tier"]["service"] == 1
    ner = next(x for x in s["services"] if x["name"] == "ner")
    assert (ner["assigned"], ner["healthy"]) == (1, 0)
    assert s["uptime_s"] >= 0
