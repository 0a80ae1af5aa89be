"""Heartbeat delay and loss on the network path, under load (a userspace proxy: ``proxy.py``).

Three real agents (direct transport) each join through their own :class:`FaultyProxy`; the
coordinator reaches their backends directly, so requests keep flowing while the proxies delay
or lose what the agents send.  Offline after 10 s of silence, removed after 30 s.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import harness as h
import pytest
from proxy import FaultyProxy

pytestmark = [pytest.mark.slow, pytest.mark.chaos]

OFFLINE_AFTER = 10.0
REMOVE_AFTER = 30.0
ENV = {
    "RMA_HEARTBEAT_INTERVAL": "1",
    "RMA_OFFLINE_AFTER": str(OFFLINE_AFTER),
    "RMA_REMOVE_AFTER": str(REMOVE_AFTER),
    "RMA_SWEEP_INTERVAL": "0.5",
    "RMA_RESTART_GRACE": "0",
    # the coordinator's default keep-alive timeout (5 s) is shorter than some delays: a delayed
    # heartbeat then meets a connection the coordinator closed, and is sent again at once
}
NAMES = ["w1", "w2", "w3"]


def judged(coord: Any) -> Counter[str]:
    """``offline`` and ``removed`` events so far, by worker name and kind."""
    return Counter(
        f"{e['kind']}:{e.get('worker_name') or e.get('worker_id')}"
        for e in h.events(coord)
        if e["kind"] in ("offline", "removed")
    )


async def _experiment(tmp_path: Path, database_url: str, name: str, faults: Any) -> h.Tally:
    """Start the pool behind the proxies, run load while ``faults(pool, proxies, tally)``
    breaks the heartbeats, and return the tally (the report is printed)."""
    gw = h.gateway_fixtures()
    pool = gw.make_pool(tmp_path / "pool", database_url, env=ENV, catalog_text=h.chaos_catalog())
    agents = []
    tally = h.Tally()
    started = time.monotonic()
    try:
        with ExitStack() as stack:
            proxies = {
                n: stack.enter_context(FaultyProxy(h.port_of(pool.url), seed=i))
                for i, n in enumerate(NAMES)
            }
            for n in NAMES:
                agents.append(
                    h.start_agent(
                        proxies[n].url, pool.coord.token(), pool.catalog, tmp_path / n, n, "direct"
                    )
                )
            h.wait_for("three healthy workers", lambda: len(h.healthy(pool.coord)) == 3, 120)
            done = asyncio.Event()

            async def run_faults() -> None:
                try:
                    await faults(pool, proxies, tally)
                finally:
                    done.set()

            async def run_load() -> None:
                while not done.is_set():  # load in slices until the faults are over
                    await h.load(pool.url, pool.api_key, 2, 4, 4, tally)

            await asyncio.gather(run_faults(), run_load())
            for p in proxies.values():
                p.delay(0, 0)
            counts: Counter[str] = Counter()
            for p in proxies.values():
                counts.update(p.counts)
            ev = judged(pool.coord)
            tally.extra.update(
                proxy=dict(counts),
                offline_events=sum(v for k, v in ev.items() if k.startswith("offline")),
                removed_events=sum(v for k, v in ev.items() if k.startswith("removed")),
                final_statuses=sorted(w["status"] for w in h.workers(pool.coord)),
                tracebacks=h.log_tracebacks(pool.coord.log),
                seconds=round(time.monotonic() - started, 1),
            )
            tally.report(name)
            return tally
    finally:
        for proc in agents:
            h.kill_machine(proc)
        pool.coord.stop()


async def statuses(pool: Any) -> dict[str, str]:
    ws = await asyncio.to_thread(h.workers, pool.coord)
    return {w["name"]: w["status"] for w in ws}


def _answered_all(tally: h.Tally) -> None:
    assert tally.answered > 0
    assert not tally.failed, f"requests failed: {dict(tally.failed)}"
    assert not [k for k in tally.streams if k != "clean"], tally.streams


async def test_heartbeat_delay(tmp_path: Path, database_url: str) -> None:
    """Every heartbeat held 2–5 s on its way (less than the offline window and the keep-alive
    timeout): nobody goes offline or is removed, and every request is answered."""
    seconds = h.scale(20, 120)

    async def faults(pool: Any, proxies: dict[str, FaultyProxy], tally: h.Tally) -> None:
        for p in proxies.values():
            p.delay(2, 5)
        stop = time.monotonic() + seconds
        seen: Counter[str] = Counter()
        while time.monotonic() < stop:
            seen.update((await statuses(pool)).values())
            await asyncio.sleep(1)
        tally.extra["statuses_seen"] = dict(seen)

    tally = await _experiment(tmp_path, database_url, "heartbeat_delay", faults)
    _answered_all(tally)
    assert tally.extra["proxy"].get("delayed", 0) >= 3
    assert tally.extra["offline_events"] == 0
    assert tally.extra["removed_events"] == 0
    assert set(tally.extra["statuses_seen"]) == {"online"}
    assert tally.extra["tracebacks"] == 0


async def test_heartbeat_loss_shorter_than_the_offline_window(
    tmp_path: Path, database_url: str
) -> None:
    """Outages of 5 s (half the offline window) in which half of every agent's heartbeat
    connections are closed or held: nobody goes offline or is removed, every request is
    answered."""
    outages = int(h.scale(2, 8))

    async def faults(pool: Any, proxies: dict[str, FaultyProxy], tally: h.Tally) -> None:
        seen: Counter[str] = Counter()
        for _ in range(outages):
            for p in proxies.values():
                p.lose(0.5, OFFLINE_AFTER / 2)
            while any(p.losing for p in proxies.values()):
                seen.update((await statuses(pool)).values())
                await asyncio.sleep(1)
            await asyncio.sleep(OFFLINE_AFTER / 2)  # the heartbeats catch up
            seen.update((await statuses(pool)).values())
        tally.extra.update(outages=outages, statuses_seen=dict(seen))

    tally = await _experiment(tmp_path, database_url, "heartbeat_loss_short", faults)
    _answered_all(tally)
    assert tally.extra["proxy"].get("lost", 0) >= outages
    assert tally.extra["offline_events"] == 0
    assert tally.extra["removed_events"] == 0
    assert set(tally.extra["statuses_seen"]) == {"online"}
    assert tally.extra["tracebacks"] == 0


async def test_heartbeat_loss_past_the_offline_window(tmp_path: Path, database_url: str) -> None:
    """One agent loses every heartbeat for 15 s (past the offline window of 10 s, short of the
    removal at 30 s): it goes offline, comes back on its next good heartbeat, nobody is
    removed, and the other workers answer every request meanwhile."""
    rounds = int(h.scale(1, 3))

    async def faults(pool: Any, proxies: dict[str, FaultyProxy], tally: h.Tally) -> None:
        back_in: list[float] = []
        for r in range(rounds):
            victim = NAMES[r % len(NAMES)]
            proxies[victim].lose(1.0, OFFLINE_AFTER + 5)
            deadline = time.monotonic() + REMOVE_AFTER
            while (await statuses(pool))[victim] != "offline":
                assert time.monotonic() < deadline, f"{victim} never went offline"
                await asyncio.sleep(0.5)
            while proxies[victim].losing:  # noqa: ASYNC110 (a deadline, not an event)
                await asyncio.sleep(0.2)
            healed = time.monotonic()
            while (await statuses(pool))[victim] != "online":
                assert time.monotonic() < healed + REMOVE_AFTER, f"{victim} did not come back"
                await asyncio.sleep(0.2)
            back_in.append(round(time.monotonic() - healed, 1))
        tally.extra.update(rounds=rounds, back_online_after_outage_s=back_in)

    tally = await _experiment(tmp_path, database_url, "heartbeat_loss_long", faults)
    _answered_all(tally)
    assert tally.extra["offline_events"] == rounds
    assert tally.extra["removed_events"] == 0
    assert tally.extra["final_statuses"] == ["online"] * 3
    assert tally.extra["tracebacks"] == 0
