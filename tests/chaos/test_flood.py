"""The connection flood: one address holds idle and slowloris sockets past its cap and keeps
opening more, while real traffic from another loopback address (127.0.0.2) is answered.

Then a spread flood (several addresses, each under its cap) fills the coordinator's total
cap: ``/readyz`` says ``saturated`` while it lasts and ``ready`` again once it is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import select
import socket
import threading
import time
from collections import Counter
from pathlib import Path

import harness as h
import httpx
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.chaos]

PER_ADDRESS = 20
TOTAL = 60
HEADER_TIMEOUT = 2.0
SLOW_HEAD = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-A: "


class Flood:
    """A thread that keeps ``PER_ADDRESS`` sockets open from 127.0.0.1 (half of them sending
    headers a byte at a time, never finishing), re-opens the ones the coordinator closes, and
    opens ``probes`` more every 0.1 s, which should be answered with a fast 503."""

    def __init__(self, port: int, probes: int = 3) -> None:
        self.port = port
        self.probes = probes
        self.counts: Counter[str] = Counter()
        self.slowest_503 = 0.0
        self._stop = threading.Event()
        self._held: dict[socket.socket, bool] = {}  # socket -> slowloris?
        self._thread = threading.Thread(target=self._run, name="flood")

    def _open(self) -> socket.socket | None:
        try:
            s = socket.create_connection(("127.0.0.1", self.port), source_address=("127.0.0.1", 0))
        except OSError:
            self.counts["connect_failed"] += 1
            return None
        self.counts["opened"] += 1
        return s

    def _verdict(self, s: socket.socket, opened_at: float | None = None) -> None:
        """``s`` is readable: what did the coordinator say before closing it?"""
        s.settimeout(2)
        try:
            head = s.recv(64)
        except OSError:
            head = b""
        s.close()
        status = head[9:12].decode() if head.startswith(b"HTTP/1.1 ") else "closed"
        self.counts[f"answer:{status}"] += 1
        if status == "503" and opened_at is not None:
            self.slowest_503 = max(self.slowest_503, time.monotonic() - opened_at)

    def _run(self) -> None:
        while not self._stop.is_set():
            # top up the held sockets to the cap, half of them slowloris
            while len(self._held) < PER_ADDRESS:
                s = self._open()
                if s is None:
                    break
                slow = len([v for v in self._held.values() if v]) < PER_ADDRESS // 2
                if slow:
                    with contextlib.suppress(OSError):
                        s.sendall(SLOW_HEAD)
                self._held[s] = slow
            # probes past the cap: each should get a 503 at once
            for _ in range(self.probes):
                opened_at = time.monotonic()
                s = self._open()
                if s is None:
                    continue
                ready, _, _ = select.select([s], [], [], 5)
                if ready:
                    self._verdict(s, opened_at)
                else:
                    self.counts["probe_not_refused"] += 1
                    s.close()
            # dribble, and collect the held sockets the coordinator closed (408, or a 503 when a
            # held one came in past the cap)
            for s, slow in list(self._held.items()):
                if slow:
                    with contextlib.suppress(OSError):
                        s.sendall(b"a")
            ready, _, _ = select.select(list(self._held), [], [], 0)
            for s in ready:
                del self._held[s]
                self._verdict(s)
            self._stop.wait(0.1)

    def __enter__(self) -> Flood:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)
        for s in self._held:
            s.close()


def other_client(url: str) -> httpx.Client:
    """A client whose connections come from 127.0.0.2."""
    transport = httpx.HTTPTransport(local_address="127.0.0.2")
    return httpx.Client(base_url=url, timeout=10, transport=transport)


async def test_connection_flood(tmp_path: Path, database_url: str) -> None:
    """0 failed requests from the other address, the flood's excess gets fast 503s, slowloris
    and idle sockets are closed with 408, and /readyz tells when the total cap is reached."""
    gw = h.gateway_fixtures()
    env = {
        "RMA_MAX_CONNECTIONS_PER_ADDRESS": str(PER_ADDRESS),
        "RMA_MAX_CONNECTIONS": str(TOTAL),
        "RMA_HEADER_TIMEOUT": str(HEADER_TIMEOUT),
    }
    started = time.monotonic()
    pool = gw.make_pool(tmp_path / "pool", database_url, env=env)
    backend = gw.start_backend("a")
    seconds = h.scale(15, 90)
    tally = h.Tally()
    ready: Counter[str] = Counter()
    try:
        pool.add_worker("wa", {"fake": backend.url})
        port = h.port_of(pool.url)
        with Flood(port) as flood:
            h.wait_for("the flood to be refused", lambda: flood.counts["answer:503"] >= 3, 30)

            async def poll_readyz() -> None:
                transport = httpx.AsyncHTTPTransport(local_address="127.0.0.2")
                async with httpx.AsyncClient(
                    base_url=pool.url, timeout=10, transport=transport
                ) as c:
                    stop = time.monotonic() + seconds
                    while time.monotonic() < stop:
                        ready[str((await c.get("/readyz")).status_code)] += 1
                        await asyncio.sleep(0.5)

            await asyncio.gather(
                h.load(pool.url, pool.api_key, seconds, 4, 4, tally, local_address="127.0.0.2"),
                poll_readyz(),
            )
        flood_counts = dict(flood.counts)
        # the total cap: 19 sockets from each of 127.0.0.3..6 (under the per-address cap)
        spread: list[socket.socket] = []
        try:
            for i in range(TOTAL - 1):
                src = f"127.0.0.{3 + i // (PER_ADDRESS - 1)}"
                spread.append(
                    socket.create_connection(("127.0.0.1", port), source_address=(src, 0))
                )
            with other_client(pool.url) as c:
                saturated = h.wait_for(
                    "/readyz to say saturated",
                    lambda: (r := c.get("/readyz")).status_code == 503 and r.json(),
                    HEADER_TIMEOUT * 2,
                    every=0.05,
                )
        finally:
            for s in spread:
                s.close()
        with other_client(pool.url) as c:
            h.wait_for("/readyz ready again", lambda: c.get("/readyz").status_code == 200, 15)
        tally.extra.update(
            flood=flood_counts,
            slowest_503_s=round(flood.slowest_503, 3),
            readyz_during_flood=dict(ready),
            readyz_at_total_cap=saturated["error"]["code"],
            tracebacks=h.log_tracebacks(pool.coord.log),
            seconds=round(time.monotonic() - started, 1),
        )
        tally.report("connection_flood")
        assert tally.answered > 0
        assert not tally.failed, f"requests from 127.0.0.2 failed: {dict(tally.failed)}"
        assert flood_counts.get("answer:503", 0) >= 10
        assert flood_counts.get("probe_not_refused", 0) == 0
        assert flood_counts.get("answer:408", 0) >= PER_ADDRESS // 2  # slowloris cut off
        assert set(ready) == {"200"}  # one address's flood does not make the pool unready
        assert saturated["error"]["code"] == "saturated"
        assert "max_connections=60" in saturated["error"]["message"]
        assert tally.extra["tracebacks"] == 0
    finally:
        backend.kill()
        pool.coord.stop()
