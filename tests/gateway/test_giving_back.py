"""Giving back: when requests queue, keys whose owners contributed more go first, and a
waiting request's priority grows with its wait (nobody starves)."""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Callable
from typing import Any

import httpx
from tests.gateway.conftest import CAPS, Backend, Pool
from tests.gateway.test_balancer import worker
from tests.gateway.test_verify import CATALOG, DIM
from typer.testing import CliRunner

from rma.coordinator.gateway.balancer import Balancer, Lease
from rma.coordinator.registry import Registry
from rma.coordinator.trust.credits import priority


def _balancer(aging: float) -> Balancer:
    registry = Registry()
    registry.put(worker("a"))
    return Balancer(
        registry,
        capacity=1,
        queue_size=16,
        queue_timeout=30,
        cooldown_base=1,
        cooldown_max=2,
        priority_aging=aging,
    )


async def _order(bal: Balancer, ranks: list[tuple[str, float]], gap: float = 0.0) -> list[str]:
    """Fill the one slot, queue one waiter per (name, priority) in that order, then free the
    slot again and again: the names in the order they got it."""
    held = await bal.acquire("svc", set())
    assert isinstance(held, Lease)
    served: list[str] = []

    async def wait(name: str, rank: float) -> None:
        lease = await bal.acquire("svc", set(), priority=rank)
        assert lease is not None
        served.append(name)
        await asyncio.sleep(0)  # let the next waiter see the queue before the slot frees
        lease.release()

    tasks = []
    for name, rank in ranks:
        tasks.append(asyncio.create_task(wait(name, rank)))
        for _ in range(10_000):  # until it is queued: the waiters queue in this order
            if bal.queued == len(tasks):
                break
            await asyncio.sleep(0.001)
        assert bal.queued == len(tasks)
        if gap:
            await asyncio.sleep(gap)
    held.release()
    async with asyncio.timeout(10):
        await asyncio.gather(*tasks)
    return served


def test_a_contributing_owners_key_is_served_before_anonymous_ones() -> None:
    bal = _balancer(aging=0.0)
    ranks = [("anon1", 0.0), ("anon2", 0.0), ("donor", priority(100.0)), ("small", priority(2))]
    served = asyncio.run(_order(bal, ranks))
    # most credits first; equal priorities in arrival order
    assert served == ["donor", "small", "anon1", "anon2"]
    assert not bal.rank  # nothing left behind


def test_aging_lets_a_long_waiter_pass_a_richer_newcomer() -> None:
    # the anonymous request waited ~0.3 s at 100 priority/s: 30 > log1p(100) = 4.6
    bal = _balancer(aging=100.0)
    served = asyncio.run(_order(bal, [("anon", 0.0), ("donor", priority(100.0))], gap=0.3))
    assert served == ["anon", "donor"]


def test_the_priority_formula() -> None:
    assert priority(0.0) == 0.0
    assert priority(-5.0) == 0.0  # a key's debits never push below the floor
    assert math.isclose(priority(math.e - 1), 1.0)
    assert priority(1000.0) > priority(10.0) > 0.0


def test_owners_from_join_and_label_add_up_and_the_donor_sees_its_credits(
    pool_factory: Callable[..., Pool], backends: Callable[..., Backend]
) -> None:
    from rma.cli.main import app

    pool = pool_factory(env={"RMA_CREDIT_ESCROW_RESULTS": "0"}, catalog_text=CATALOG)
    b = backends("b", "--dim", DIM)
    ids = {}
    for name, extra in (("w1", {"owner": "alice"}), ("w2", {"labels": {"owner": "bob"}})):
        body = {"token": pool.coord.token(), "name": name, "capabilities": CAPS,
                "transport": "direct", "runnable": ["emb"], **extra}  # fmt: skip
        r = httpx.post(pool.url + "/api/worker/register", json=body, timeout=10)
        assert r.status_code == 201, r.text
        ids[name] = r.json()["worker_id"]
        pool.workers[name] = (r.json()["worker_id"], r.json()["credential"])
        pool.heartbeat(name, {"emb": b.url})
    with pool.coord.admin() as c:
        owners = {w["name"]: w["owner"] for w in c.get("/api/admin/workers").json()}
    assert owners == {"w1": "alice", "w2": "bob"}  # --owner, else the owner label

    env = {"RMA_COORDINATOR_URL": pool.url, "RMA_ADMIN_KEY": pool.coord.admin_key}
    r = CliRunner().invoke(app, ["admin", "keys", "create", "--owner", "alice", "--json"], env=env)
    assert r.exit_code == 0, r.output
    created = json.loads(r.stdout)
    assert created["owner"] == "alice"
    with pool.coord.admin() as c:
        listed = {k["id"]: k["owner"] for k in c.get("/api/admin/keys").json()}
    assert listed[created["id"]] == "alice"
    r = CliRunner().invoke(app, ["admin", "keys", "list"], env={**env, "COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    assert "OWNER" in r.stdout
    assert any(created["id"] in line and "alice" in line for line in r.stdout.splitlines())

    sent = 0
    with pool.client(created["key"]) as c:
        while sent < 40:  # until both workers served some (the balancer spreads them)
            r = c.post("/v1/embeddings", json={"model": "fake-embed", "input": "x"})
            assert r.status_code == 200, r.text
            sent += 1

    def by_owner() -> dict[str, dict[str, Any]]:
        with pool.coord.admin() as c:
            r = c.get("/api/admin/credits", params={"by": "owner"})
            assert r.status_code == 200, r.text
            return {row["owner"]: row for row in r.json()}

    deadline = time.monotonic() + 60
    while sum(row["requests"] for row in by_owner().values()) < sent:
        assert time.monotonic() < deadline, by_owner()
        time.sleep(0.2)
    rows = by_owner()
    assert set(rows) <= {"alice", "bob"}
    assert rows["alice"]["requests"] + rows.get("bob", {"requests": 0})["requests"] == sent

    # the heartbeat answer carries the worker's own credits (rma worker status shows them)
    _, credential = pool.workers["w1"]
    services = [{"name": "emb", "state": "running", "healthy": True, "endpoint": b.url}]
    r = httpx.post(pool.url + "/api/worker/heartbeat", json={"services": services},
                   headers={"authorization": f"Bearer {credential}"}, timeout=10)  # fmt: skip
    assert r.status_code == 200, r.text
    beat = r.json()
    assert beat["credits"] == rows["alice"]["credits"] > 0
    assert beat["escrow"] == 0.0
