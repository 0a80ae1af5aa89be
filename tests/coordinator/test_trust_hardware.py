"""Claimed hardware: a GPU-tier worker keeps its GPU services only once one answered health
checks; one whose GPU never shows within ``gpu_verify_window`` loses them and is re-tiered."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from rma.coordinator.clock import FakeClock
from rma.settings import CoordinatorSettings

from .conftest import GPU_CAPS, Api, Registered

WINDOW = 300.0


@pytest.fixture
def settings(tmp_path: Path, database_url: str) -> CoordinatorSettings:
    return CoordinatorSettings(
        data_dir=tmp_path / "data", database_url=database_url, gpu_verify_window=WINDOW
    )


def wait(api: Api, clock: FakeClock, w: Registered, seconds: float, healthy: list[str]) -> None:
    """Let ``seconds`` pass with a heartbeat every 60 s (credentials renewed as agents do)."""
    while seconds > 0:
        step = min(60.0, seconds)
        clock.advance(step)
        seconds -= step
        body = report(api, w, healthy)
        if body.get("credential"):
            w.credential = body["credential"]
        api.app.state.sweeper.run_once()


def gpu_services(api: Api, names: list[str]) -> list[str]:
    catalog = api.pool.catalog
    return [n for n in names if catalog[n].gpu or catalog[n].tier == 1]


def report(api: Api, w: Registered, healthy: list[str]) -> dict[str, Any]:
    services = [{"name": n, "state": "running", "healthy": True} for n in healthy]
    return dict(api.heartbeat(w, services=services))


def test_a_made_up_gpu_loses_its_gpu_services(api: Api, clock: FakeClock) -> None:
    liar = api.register("liar", GPU_CAPS)
    assert liar.body["tier_name"] == "gpu"
    gpu = gpu_services(api, [s["name"] for s in liar.body["assignments"]])
    assert gpu, "the built-in catalog gives a GPU worker GPU services"
    wait(api, clock, liar, WINDOW - 1, [])
    assert api.worker(liar.id)["tier_name"] == "gpu"  # still inside its window
    wait(api, clock, liar, 2, [])
    worker = api.worker(liar.id)
    assert worker["tier_name"] == "service"  # what its CPU and RAM give
    assert not gpu_services(api, worker["assignments"])
    body = report(api, liar, [])
    assert not gpu_services(api, [s["name"] for s in body["assignments"]])  # the agent stops them
    (event,) = api.events("gpu_unverified")
    assert event["worker_id"] == liar.id
    assert sorted(event["data"]["dropped"]) == sorted(gpu)
    api.app.state.sweeper.run_once()
    assert len(api.events("gpu_unverified")) == 1  # once


def test_a_gpu_that_serves_keeps_its_tier(api: Api, clock: FakeClock) -> None:
    real = api.register("real", GPU_CAPS)
    gpu = gpu_services(api, [s["name"] for s in real.body["assignments"]])
    wait(api, clock, real, 60, gpu[:1])  # its GPU service answered its health checks
    wait(api, clock, real, WINDOW * 2, gpu[:1])
    worker = api.worker(real.id)
    assert worker["tier_name"] == "gpu"
    assert set(gpu) <= set(worker["assignments"])
    assert api.events("gpu_unverified") == []
