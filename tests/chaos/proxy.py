"""A userspace TCP proxy that delays or drops what an agent sends its coordinator.

``tc netem`` is missing from this kernel, so heartbeat delay and loss are made here: each agent
joins through its own :class:`FaultyProxy` (``--coordinator http://127.0.0.1:<proxy port>``), so
everything it sends the coordinator (registration, heartbeats) passes through it, while the
coordinator still reaches the agent's backend directly.  The proxy runs its own event loop in a
thread, so a test may block (poll with deadlines) while it works.

- :meth:`FaultyProxy.delay`: every request from the agent (a chunk that starts with an HTTP
  method) is held ``lo``..``hi`` seconds before it is passed on (in order per connection);
- :meth:`FaultyProxy.lose`: for ``seconds``, a ``share`` of the chunks from the agent is lost: the
  connection is either closed at once or held (nothing passed on, closed when the outage ends),
  alternately; new connections meet the same fate.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading
import time
from collections import Counter
from typing import Any

_REQUEST_STARTS = (b"GET ", b"POST", b"PUT ", b"DELE", b"PATC")


class FaultyProxy:
    def __init__(self, target_port: int, seed: int = 0) -> None:
        self.target_port = target_port
        self.port = 0
        self.counts: Counter[str] = Counter()
        self._delay: tuple[float, float] = (0.0, 0.0)
        self._lose_until = 0.0
        self._share = 0.0
        self._random = random.Random(seed)
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._thread = threading.Thread(target=self._run, name="faulty-proxy", daemon=True)

    # --- the knobs (called from the test's thread) -------------------------------------------

    def delay(self, lo: float, hi: float) -> None:
        self._delay = (lo, hi)

    def lose(self, share: float, seconds: float) -> None:
        self._share = share
        self._lose_until = time.monotonic() + seconds

    @property
    def losing(self) -> bool:
        return time.monotonic() < self._lose_until

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # --- life -----------------------------------------------------------------------------------

    def __enter__(self) -> FaultyProxy:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the proxy did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        fut = asyncio.run_coroutine_threadsafe(self._close(), self._loop)
        fut.result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._handle, "127.0.0.1", 0)
        )
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()

    async def _close(self) -> None:
        assert self._server is not None
        self._server.close()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    # --- the work -------------------------------------------------------------------------------

    def _fate(self) -> str | None:
        """None (pass it on), ``closed`` or ``held`` for a chunk or a new connection."""
        if not self.losing or self._random.random() >= self._share:
            return None
        self.counts["lost"] += 1
        return "closed" if self.counts["lost"] % 2 else "held"

    async def _handle(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.counts["connections"] += 1
        sw: asyncio.StreamWriter | None = None
        try:
            if await self._doom(self._fate()):
                return
            sr, sw = await asyncio.open_connection("127.0.0.1", self.target_port)
            back = asyncio.create_task(self._pipe(sr, cw))
            try:
                while chunk := await cr.read(65536):
                    if await self._doom(self._fate()):
                        return
                    lo, hi = self._delay
                    if hi > 0 and chunk[:4] in _REQUEST_STARTS:
                        self.counts["delayed"] += 1
                        await asyncio.sleep(self._random.uniform(lo, hi))
                    sw.write(chunk)
                    await sw.drain()
                    self.counts["passed"] += 1
            finally:
                back.cancel()
                with contextlib.suppress(asyncio.CancelledError, OSError):
                    await back
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            for w in (cw, sw):
                if w is not None:
                    w.close()
                    with contextlib.suppress(OSError, asyncio.CancelledError):
                        await w.wait_closed()
            self._tasks.discard(task)

    async def _doom(self, fate: str | None) -> bool:
        if fate is None:
            return False
        self.counts[fate] += 1
        if fate == "held":  # a black hole until the outage is over
            while self.losing:  # noqa: ASYNC110 (the outage is a deadline, not an event)
                await asyncio.sleep(0.1)
        return True

    @staticmethod
    async def _pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while chunk := await r.read(65536):
            w.write(chunk)
            await w.drain()
        with contextlib.suppress(OSError):
            w.write_eof()
