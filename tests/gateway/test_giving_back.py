"""Giving back: when requests queue, keys whose owners contributed more go first, and a
waiting request's priority grows with its wait (nobody starves)."""

from __future__ import annotations

import asyncio
import math

from rma.coordinator.gateway.balancer import Balancer, Lease
from rma.coordinator.registry import Registry
from rma.coordinator.trust.credits import priority
from tests.gateway.test_balancer import worker


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
        async with asyncio.timeout(10):
            while bal.queued < len(tasks):  # queued, in this order
                await asyncio.sleep(0.001)
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
