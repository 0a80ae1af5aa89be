"""``split_capacity``: coordinators on one PostgreSQL database share each worker's capacity.

In-process coordinators (see ``test_cluster.py``); the live ones are counted in the database.
Needs ``RMA_TEST_DATABASE_URL`` (PostgreSQL); skips otherwise.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.conftest import TEST_DB_URL

from rma.coordinator.clock import FakeClock

from .test_cluster import Apps, wait_for

pytestmark = pytest.mark.skipif(
    not TEST_DB_URL or not TEST_DB_URL.startswith("postgres"),
    reason="several coordinators need PostgreSQL: set RMA_TEST_DATABASE_URL",
)


@pytest.fixture
def apps(tmp_path: Path, database_url: str) -> Iterator[Apps]:
    started = Apps(tmp_path, database_url, FakeClock())
    try:
        yield started
    finally:
        started.stop_all()


def test_with_split_capacity_each_coordinator_takes_its_share(apps: Apps) -> None:
    a = apps.start("A", split_capacity=True, worker_capacity=8)
    b = apps.start("B", split_capacity=True, worker_capacity=8)
    worker = a.register("w1")
    state = wait_for("B to know the worker", lambda: b.pool.registry.get(worker.id))
    on_a, on_b = a.app.state.gateway.balancer, b.app.state.gateway.balancer
    wait_for("both to count two coordinators", lambda: on_a.split == 2 and on_b.split == 2)
    assert on_b.capacity_of(state) == 4  # 8 over two coordinators: they stay within 8
    assert on_a.capacity_of(a.pool.registry.get(worker.id)) == 4
    lines = b.client.get("/metrics").text.splitlines()
    assert [float(n.split()[1]) for n in lines if n.startswith("rma_coordinators ")] == [2.0]

    c = apps.start("C", worker_capacity=8)  # counts, but keeps its whole share: not split
    wait_for("three coordinators counted", lambda: on_a.split == 3 and on_b.split == 3)
    assert on_a.capacity_of(state) == 2  # 8 // 3
    assert c.app.state.gateway.balancer.capacity_of(state) == 8

    apps.stop(c)
    apps.stop(b)
    wait_for("A to count itself alone again", lambda: on_a.split == 1)
    assert on_a.capacity_of(state) == 8
