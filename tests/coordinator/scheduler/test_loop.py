"""The reconciliation loop in the real coordinator app, with fabricated workers and a FakeClock."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from tests.coordinator.conftest import DATA_CAPS, SERVICE_CAPS, Api, Registered

from rma.coordinator.clock import FakeClock
from rma.settings import CoordinatorSettings

PAIR = """
[services.pair]
tier = 2
replicas = 2
command = ["true"]
[services.pair.resources]
memory_mb = 256
"""


@pytest.fixture
def catalog_file(tmp_path: Path) -> Path:
    path = tmp_path / "catalog.toml"
    path.write_text(PAIR)
    return path


@pytest.fixture
def settings(tmp_path: Path, database_url: str, catalog_file: Path) -> CoordinatorSettings:
    return CoordinatorSettings(
        data_dir=tmp_path / "data", database_url=database_url, catalog=catalog_file
    )


def names(answer: dict[str, Any]) -> list[str]:
    return sorted(s["name"] for s in answer["assignments"])


def holders(api: Api, service: str) -> set[str]:
    return {w["name"] for w in api.workers() if service in w["assignments"]}


def healthy(*services: str) -> list[dict[str, Any]]:
    return [{"name": s, "state": "running", "healthy": True} for s in services]


def test_a_lost_holder_is_replaced_within_one_heartbeat_interval(
    api: Api, clock: FakeClock
) -> None:
    clock.advance(api.pool.settings.grace)
    workers = {n: api.register(n) for n in ("a", "b", "c", "d", "e")}
    have = holders(api, "pair")
    assert len(have) == 2
    lost = sorted(have)[0]
    # everyone but the lost holder keeps beating; the sweeper marks it offline
    clock.advance(api.pool.settings.offline_after)
    answers = {n: api.heartbeat(w) for n, w in workers.items() if n != lost}
    assert api.app.state.sweeper.run_once()["offline"] == [workers[lost].id]
    # the very next heartbeat of the others (one interval later at most) carries the replacement
    clock.advance(api.pool.settings.heartbeat_interval)
    answers = {n: api.heartbeat(w) for n, w in workers.items() if n != lost}
    now = {n for n, a in answers.items() if "pair" in names(a)}
    assert len(now) == 2 and lost not in now
    new = (now - have).pop()
    assigned = [e for e in api.events("assigned") if e["data"]["service"] == "pair"]
    assert assigned[-1]["worker_id"] == workers[new].id
    assert assigned[-1]["data"]["reason"] == "pair had 1 of 2 wanted replicas"
    assert "offline" in assigned[-1]["data"]["trigger"]
    gone = [e for e in api.events("unassigned") if e["data"]["service"] == "pair"]
    assert gone[-1]["worker_id"] == workers[lost].id
    listed = {s["name"]: s for s in api.client.get("/api/admin/services", headers=api.admin).json()}
    assert listed["pair"]["wanted"] == 2 and listed["pair"]["assigned"] == 2


def test_catalog_reload_reaches_running_workers(api: Api, catalog_file: Path) -> None:
    w = api.register("w")
    assert "extra" not in names(api.heartbeat(w))
    catalog_file.write_text(
        PAIR + '\n[services.extra]\ntier = 2\ncommand = ["true"]\n'
        '[services.extra.env]\nGREETING = "hello"\n'
    )
    r = api.client.post("/api/admin/catalog/reload", headers=api.admin)
    assert r.status_code == 200, r.text
    assert "extra" in r.json()["services"]
    spec = {s["name"]: s for s in api.heartbeat(w)["assignments"]}["extra"]
    assert spec["env"] == {"GREETING": "hello"}
    assert api.events("catalog_reloaded")
    # a broken file is a clear 422 and changes nothing
    catalog_file.write_text("[services.bad\n")
    r = api.client.post("/api/admin/catalog/reload", headers=api.admin)
    assert r.status_code == 422
    assert r.json()["error"]["code"] == "bad_catalog"
    assert "extra" in names(api.heartbeat(w))


def test_drain_hands_over_before_the_worker_lets_go(api: Api) -> None:
    first = api.register("d1", DATA_CAPS)
    assert "postgres" in names(first.body)  # the built-in database, replicas = 1
    second = api.register("d2", DATA_CAPS)
    assert "postgres" not in names(second.body)
    api.heartbeat(first, services=healthy("postgres"))
    r = api.client.post(f"/api/admin/workers/{first.id}/drain", headers=api.admin)
    assert r.status_code == 200, r.text
    # a data service: placed elsewhere once the holder's fresh backup is in (test_drain_backup)
    assert api.heartbeat(first, services=healthy("postgres"))["backup"] == ["postgres"]
    r = api.client.put("/api/worker/backups/postgres", content=b"--\n", headers=first.headers)
    assert r.status_code == 201, r.text
    # the replacement is placed now; the draining worker keeps its copy meanwhile
    assert "postgres" in names(api.heartbeat(second))
    assert "postgres" in names(api.heartbeat(first, services=healthy("postgres")))
    # the replacement is healthy: now the draining worker lets go
    api.heartbeat(second, services=healthy("postgres"))
    assert "postgres" not in names(api.heartbeat(first, services=healthy("postgres")))
    gone = [e for e in api.events("unassigned") if e["data"]["service"] == "postgres"]
    assert gone[-1]["data"]["reason"] == "worker d1 is draining; handed over to d2"


def test_a_16gb_8gb_gpu_worker_gets_vllm_on_its_gpu(api: Api) -> None:
    caps = {
        "cpu_cores": 8,
        "memory_mb": 16384,
        "gpus": [{"name": "RTX 4060", "memory_mb": 8192}],
    }
    w = api.register("gamer", caps)
    specs = {s["name"]: s for s in w.body["assignments"]}
    assert "vllm" in specs and "ollama" not in specs
    assert specs["vllm"]["gpu_devices"] == [0]
    assert specs["vllm"]["gpu_share"] == 0.95


def test_two_8gb_gpus_are_not_one_16gb_gpu(api: Api, catalog_file: Path) -> None:
    catalog_file.write_text(
        "".join(
            f'[services.g{i}]\ntier = 1\ngpu = true\npriority = 20\ncommand = ["true"]\n'
            f"[services.g{i}.resources]\nvram_mb = 5000\n"
            for i in range(3)
        )
    )
    api.client.post("/api/admin/catalog/reload", headers=api.admin).raise_for_status()
    caps = {
        "cpu_cores": 8,
        "memory_mb": 65536,
        "gpus": [{"name": "a", "memory_mb": 8192}, {"name": "b", "memory_mb": 8192}],
    }
    w: Registered = api.register("twin", caps)
    mine = [s for s in w.body["assignments"] if s["name"].startswith("g")]
    assert len(mine) == 2  # 3 x 5000 MB fit 16 GB summed, but only one per 8 GB GPU
    assert sorted(s["gpu_devices"] for s in mine) == [[0], [1]]


def test_services_route_lists_every_service(api: Api) -> None:
    api.register("s", SERVICE_CAPS)
    r = api.client.get("/api/admin/services", headers=api.admin)
    assert r.status_code == 200
    rows = {row["name"]: row for row in r.json()}
    assert set(rows) == set(api.pool.catalog)
    assert {"wanted", "assigned", "healthy", "inflight", "queued"} <= set(rows["llm"])
    assert rows["pair"]["wanted"] == 2 and rows["pair"]["assigned"] == 1
    assert api.client.get("/api/admin/services").status_code == 401


def test_what_a_worker_can_run_survives_a_coordinator_restart(
    api: Api, settings: CoordinatorSettings, clock: FakeClock
) -> None:
    from fastapi.testclient import TestClient

    from rma.coordinator.app import create_app

    w = api.register("picky", runnable=["llm", "pair"])
    assert names(w.body) == ["llm", "pair"]
    again = create_app(settings, clock=clock, run_sweeper=False)
    try:
        with TestClient(again):
            state = again.state.pool.registry.get(w.id)
            assert state.runnable == frozenset({"llm", "pair"})
            assert sorted(state.assignments) == ["llm", "pair"]  # the restart's pass added nothing
    finally:
        again.state.pool.engine.dispose()
