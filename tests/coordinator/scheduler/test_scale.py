"""Demand-driven scaling: the pure Scaler, then in the coordinator with a FakeClock."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from tests.coordinator.conftest import Api

from rma.coordinator.clock import FakeClock
from rma.coordinator.scheduler.scale import Demand, Scaler, ScaleSettings
from rma.schemas.api import ServiceSpec
from rma.settings import CoordinatorSettings

BURST = ServiceSpec(name="burst", replicas=1, max_replicas=3, capacity=2)
FAST = ScaleSettings(up_window=30, down_after=100, cooldown=60)


def busy(healthy: int, inflight: int, queued: int = 0) -> Demand:
    return Demand(healthy=healthy, inflight=inflight, queued=queued)


def test_scale_up_only_after_the_window_then_cool_down() -> None:
    s = Scaler(FAST)
    assert s.observe(0, BURST, busy(1, 2)) is None  # 2 / (1 x 2) = 1.0 > 0.8: the window starts
    assert s.observe(29, BURST, busy(1, 2)) is None
    step = s.observe(30, BURST, busy(1, 2))
    assert step is not None and step.kind == "scaled_up" and step.wanted == 2
    assert "utilization 1.00" in step.reason
    assert s.wanted() == {"burst": 2}
    # still busy with the new replica healthy: a new window starts; the cool-down holds it too
    assert s.observe(31, BURST, busy(2, 4)) is None
    assert s.observe(89, BURST, busy(2, 4)) is None  # window done, cool-down (60 s) not yet
    step = s.observe(91, BURST, busy(2, 4))
    assert step is not None and step.wanted == 3
    # the cap: never above max_replicas
    assert s.observe(300, BURST, busy(3, 6)) is None
    assert s.wanted() == {"burst": 3}


def test_hysteresis_resets_the_window() -> None:
    s = Scaler(FAST)
    s.observe(0, BURST, busy(1, 2))
    s.observe(20, BURST, busy(2, 2))  # 0.5: between the thresholds, the window resets
    assert s.observe(31, BURST, busy(1, 2)) is None
    assert s.observe(61, BURST, busy(1, 2)) is not None


def test_no_step_up_before_the_last_replica_is_healthy() -> None:
    s = Scaler(ScaleSettings(up_window=0, cooldown=0))
    assert s.observe(0, BURST, busy(1, 8)) is not None  # wanted 2
    assert s.observe(1, BURST, busy(1, 8)) is None  # only 1 healthy of the 2 wanted yet
    assert s.observe(2, BURST, busy(2, 8)) is not None


def test_scale_down_after_the_quiet_period_never_below_replicas() -> None:
    s = Scaler(ScaleSettings(up_window=0, down_after=100, cooldown=0))
    s.observe(0, BURST, busy(1, 2))
    assert s.wanted() == {"burst": 2}
    assert s.observe(10, BURST, busy(2, 0)) is None  # quiet starts
    step = s.observe(110, BURST, busy(2, 0))
    assert step is not None and step.kind == "scaled_down" and step.wanted == 1
    assert s.observe(500, BURST, busy(1, 0)) is None  # at the minimum


def test_only_services_with_room_between_min_and_max_scale() -> None:
    s = Scaler(ScaleSettings(up_window=0, cooldown=0))
    for spec in (
        ServiceSpec(name="every", replicas=0, max_replicas=3),
        ServiceSpec(name="fixed", replicas=2),
        ServiceSpec(name="same", replicas=2, max_replicas=2),
    ):
        assert s.observe(0, spec, busy(1, 100)) is None
    assert s.wanted() == {}


BURST_TOML = """
[services.burst]
tier = 2
replicas = 1
max_replicas = 3
capacity = 2
command = ["true"]
"""


@pytest.fixture
def settings(tmp_path: Path, database_url: str) -> CoordinatorSettings:
    catalog = tmp_path / "catalog.toml"
    catalog.write_text(BURST_TOML)
    return CoordinatorSettings(
        data_dir=tmp_path / "data",
        database_url=database_url,
        catalog=catalog,
        scale_up_window=10,
        scale_down_after=60,
        scale_cooldown=0,
    )


def running(*services: str) -> list[dict[str, Any]]:
    return [{"name": s, "state": "running", "healthy": True} for s in services]


def holders(api: Api) -> list[str]:
    return sorted(w["name"] for w in api.workers() if "burst" in w["assignments"])


def test_demand_scales_up_then_back_down_in_the_coordinator(api: Api, clock: FakeClock) -> None:
    workers = [api.register(f"w{i}") for i in range(3)]
    assert len(holders(api)) == 1
    scheduler = api.pool.scheduler

    def beat() -> None:
        for w in workers:
            mine = "burst" in api.worker(w.id)["assignments"]
            api.heartbeat(w, services=running("burst") if mine else [])

    beat()
    scheduler.scale({"burst": 4}, {"burst": 2})  # 6 / (1 x 2): far above 0.8
    clock.advance(10)
    steps = scheduler.scale({"burst": 4}, {"burst": 2})
    assert [(s.kind, s.wanted) for s in steps] == [("scaled_up", 2)]
    assert len(holders(api)) == 2
    up = api.events("scaled_up")
    assert up and up[-1]["data"]["service"] == "burst" and up[-1]["data"]["wanted"] == 2
    rows = {r["name"]: r for r in api.client.get("/api/admin/services", headers=api.admin).json()}
    assert rows["burst"]["wanted"] == 2
    assert rows["burst"]["last_scaling_event"].startswith("burst scaled up to 2 replicas")
    # quiet for the whole quiet period: back to the minimum, with an event naming why
    beat()
    scheduler.scale({}, {})
    clock.advance(60)
    steps = scheduler.scale({}, {})
    assert [(s.kind, s.wanted) for s in steps] == [("scaled_down", 1)]
    assert len(holders(api)) == 1
    gone = api.events("unassigned")
    assert gone[-1]["data"]["reason"] == "burst has more replicas than the 1 wanted"
