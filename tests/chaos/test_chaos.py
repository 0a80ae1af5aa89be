"""Chaos experiments: each states a promise of docs/reliability.md, breaks the pool, counts.

Each prints one ``chaos NAME: {...}`` line with its counts (sent, answered, failed by reason,
streams ended cleanly / with an error event / otherwise) and asserts the promise.  Small in the
normal suite; ``nox -s chaos`` runs them long (``RMA_CHAOS_SCALE=full``) and keeps the lines in
``RMA_CHAOS_RESULTS``.
"""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from pathlib import Path

import harness as h
import httpx
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.chaos]

#: Failures that are the promise kept, not broken: a stream cut by a dying worker ends with an
#: ``error`` event (bytes had reached the client, so it cannot be retried).
_EXPECTED = {"stream_error_event"}


def _no_losses(tally: h.Tally) -> None:
    lost = {k: v for k, v in tally.failed.items() if k not in _EXPECTED}
    assert not lost, f"requests lost: {lost}"
    assert not [k for k in tally.streams if k.startswith("other")], tally.streams
    assert tally.answered > 0


@pytest.mark.parametrize("transport", ["direct", "tunnel"])
async def test_worker_churn(tmp_path: Path, database_url: str, transport: str) -> None:
    """SIGKILL a whole machine (agent + backend) every few seconds under plain and streamed load:
    no non-streamed request is lost (kills mid-body included), every broken stream ends with one
    ``error`` event, no connection is spoiled, no traceback in the coordinator's log."""
    gw = h.gateway_fixtures()
    pool = gw.make_pool(tmp_path / "pool", database_url, catalog_text=h.chaos_catalog())
    names = ["w1", "w2", "w3"]
    agents: dict[str, object] = {}

    def start(name: str) -> None:
        agents[name] = h.start_agent(
            pool.url, pool.coord.token(), pool.catalog, tmp_path / name, name, transport
        )

    try:
        for name in names:
            start(name)
        h.wait_for("three healthy workers", lambda: len(h.healthy(pool.coord)) == 3, 120)
        tally = h.Tally()
        seconds = h.scale(20, 120)
        every = h.scale(4, 5)
        kills = 0
        done = asyncio.Event()

        async def churn() -> None:
            nonlocal kills
            i = 0
            while not done.is_set():
                with_deadline = asyncio.wait_for(done.wait(), every)
                try:
                    await with_deadline
                    return
                except TimeoutError:
                    pass
                victim = names[i % len(names)]
                i += 1
                await asyncio.to_thread(h.kill_machine, agents[victim])  # type: ignore[arg-type]
                kills += 1
                start(victim)  # the machine comes back (same data dir: the same worker)

        async def run_load() -> None:
            try:
                await h.load(pool.url, pool.api_key, seconds, 6, 4, tally)
            finally:
                done.set()

        await asyncio.gather(run_load(), churn())
        log = pool.coord.log
        tally.extra.update(
            transport=transport,
            kills=kills,
            # attempts retried elsewhere after a worker died mid-body (held-back answers)
            mid_body_retries=h.log_count(log, "the body broke")
            + h.log_count(log, "the body stalled"),
            # attempts on a dead machine: about one per kill (it leaves routing at once)
            refused_attempts=h.log_count(log, "could not connect")
            + h.log_count(log, "tunnel closed")
            + h.log_count(log, "has no tunnel connected"),
            tracebacks=h.log_tracebacks(log),
        )
        tally.report(f"worker_churn_{transport}")
        assert kills >= 2
        _no_losses(tally)
        assert tally.extra["tracebacks"] == 0
    finally:
        for proc in agents.values():
            h.kill_machine(proc)  # type: ignore[arg-type]
        pool.coord.stop()


def test_coordinator_crash_loop(tmp_path: Path, database_url: str) -> None:
    """SIGKILL the coordinator and start it again, over and over (same port, same database):
    routing comes back each time, and no worker is ever judged offline or removed."""
    gw = h.gateway_fixtures()
    catalog = tmp_path / "catalog.toml"
    catalog.write_text(h.chaos_catalog())
    port = gw.free_port()
    db = None if database_url.startswith("sqlite") else database_url
    env = {"RMA_OFFLINE_AFTER": "6", "RMA_REMOVE_AFTER": "12", "RMA_SWEEP_INTERVAL": "0.5"}

    def start_coord():  # type: ignore[no-untyped-def]
        return gw.start_coordinator(
            tmp_path / "coord",
            port=port,
            database_url=db,
            extra_args=["--catalog", str(catalog)],
            env=env,
        )

    coord = start_coord()
    with coord.admin() as c:
        key = c.post("/api/admin/keys", json={"name": "chaos", "rpm": 0}).json()["key"]
    agents = [
        h.start_agent(coord.url, coord.token(), catalog, tmp_path / n, n, t)
        for n, t in (("w1", "direct"), ("w2", "tunnel"))
    ]
    restarts = int(h.scale(4, 20))
    back_in: list[float] = []
    tally = h.Tally()
    try:
        h.wait_for("two healthy workers", lambda: len(h.healthy(coord)) == 2, 120)
        body = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}
        headers = {"authorization": f"Bearer {key}"}
        for _ in range(restarts):
            started = time.monotonic()  # from the SIGKILL to the first routed answer
            coord.stop(signal.SIGKILL)
            coord = start_coord()

            def answered() -> bool:
                tally.sent += 1
                try:
                    r = httpx.post(
                        coord.url + "/v1/chat/completions", json=body, headers=headers, timeout=10
                    )
                except httpx.HTTPError as exc:
                    tally.failed[f"transport:{type(exc).__name__}"] += 1
                    return False
                if r.status_code != 200:
                    tally.failed[f"http:{r.status_code}"] += 1  # e.g. 503 before workers return
                    return False
                tally.answered += 1
                return True

            h.wait_for("routing after a restart", answered, 60, every=0.1)
            back_in.append(round(time.monotonic() - started, 2))
            statuses = {w["name"]: w["status"] for w in h.workers(coord)}
            assert set(statuses.values()) == {"online"}, statuses
        judged = [e for e in h.events(coord) if e["kind"] in ("offline", "removed")]
        tally.extra.update(
            restarts=restarts,
            routing_back_s=back_in,
            falsely_offline_or_removed=len(judged),
            database="postgresql" if db else "sqlite",
        )
        tally.report("coordinator_crash_loop")
        assert judged == []
    finally:
        for proc in agents:
            h.kill_machine(proc)
        coord.stop()


def test_mass_silence_removes_nobody(tmp_path: Path, database_url: str) -> None:
    """Every worker goes silent at once, past the removal window: the coordinator suspects
    itself (a ``suspect`` event) and removes nobody; their next heartbeats bring them back."""
    gw = h.gateway_fixtures()
    grace = 5.0
    env = {
        "RMA_OFFLINE_AFTER": "3",
        "RMA_REMOVE_AFTER": "6",
        "RMA_SWEEP_INTERVAL": "0.3",
        "RMA_RESTART_GRACE": str(grace),
    }
    t0 = time.monotonic()
    pool = gw.make_pool(tmp_path / "pool", database_url, env=env)
    names = [f"s{i}" for i in range(int(h.scale(4, 10)))]
    registered: list[str] = []
    endpoint = {"echo": "http://127.0.0.1:9/"}
    stop = threading.Event()

    def beat() -> None:  # every registered worker, every 0.5 s, until told to stop
        while not stop.is_set():
            for name in list(registered):
                pool.heartbeat(name, endpoint)
            stop.wait(0.5)

    t = threading.Thread(target=beat)
    t.start()
    try:
        for name in names:
            pool.add_worker(name, endpoint)
            registered.append(name)
        h.wait_for("the restart grace to pass", lambda: time.monotonic() - t0 > grace + 1, 60)
        statuses = [w["status"] for w in h.workers(pool.coord)]
        assert set(statuses) == {"online"}, statuses
        stop.set()  # everyone silent at once
        t.join()
        silent_since = time.monotonic()
        h.wait_for(
            "a suspect event", lambda: any(e["kind"] == "suspect" for e in h.events(pool.coord)), 30
        )
        # well past the removal window
        h.wait_for("the removal window to pass", lambda: time.monotonic() - silent_since > 12, 30)
        statuses = [w["status"] for w in h.workers(pool.coord)]
        removed = statuses.count("removed")
        for name in names:  # they come back
            pool.heartbeat(name, endpoint)
        back = h.wait_for(
            "everyone online again",
            lambda: all(w["status"] == "online" for w in h.workers(pool.coord)),
            30,
        )
        tally = h.Tally()
        tally.extra.update(workers=len(names), removed=removed, statuses_when_silent=statuses)
        tally.report("mass_silence")
        assert removed == 0
        assert back
    finally:
        stop.set()
        t.join()
        pool.coord.stop()


async def test_stalling_backend(tmp_path: Path, database_url: str) -> None:
    """One of two workers stalls or resets mid-body: non-streamed answers come from the other
    one, streams that stall end with an ``error`` event within the stall timeout."""
    gw = h.gateway_fixtures()
    pool = gw.make_pool(tmp_path / "pool", database_url)
    backends = [gw.start_backend(n) for n in ("a", "b")]
    try:
        for b in backends:
            pool.add_worker(f"w{b.name}", {"fake": b.url})
        tally = h.Tally()
        n = int(h.scale(12, 60))
        headers = {"authorization": f"Bearer {pool.api_key}"}
        async with httpx.AsyncClient(base_url=pool.url, headers=headers, timeout=30) as c:

            async def plain(i: int) -> None:
                how = ("stall", "reset")[i % 2]
                content = f"[{how}@a] {i}"
                body = {"model": "fake-model", "messages": [{"role": "user", "content": content}]}
                tally.sent += 1
                r = await c.post("/v1/chat/completions", json=body)
                if r.status_code == 200 and r.json()["choices"][0]["message"]["content"].endswith(
                    "from b"
                ):
                    tally.answered += 1
                else:
                    tally.failed[f"http:{r.status_code}"] += 1

            async def streamed(i: int) -> None:
                body = {
                    "model": "fake-model",
                    "stream": True,
                    "messages": [{"role": "user", "content": f"[stall] {i}"}],
                }
                tally.sent += 1
                async with c.stream("POST", "/v1/chat/completions", json=body) as r:
                    text = "".join([p async for p in r.aiter_text()])
                if text.count("event: error") == 1 and "stream_timeout" in text:
                    tally.streams["error_event"] += 1
                    tally.failed["stream_error_event"] += 1
                else:
                    tally.streams["other:cut"] += 1

            await asyncio.gather(*(plain(i) for i in range(n)), *(streamed(i) for i in range(4)))
        tally.extra["tracebacks"] = h.log_tracebacks(pool.coord.log)
        tally.report("stalling_backend")
        _no_losses(tally)
        assert tally.streams["error_event"] == 4
        assert tally.extra["tracebacks"] == 0
    finally:
        for b in backends:
            b.kill()
        pool.coord.stop()
