"""Time, replaceable in tests (liveness is tested with a controllable clock)."""

from __future__ import annotations

import time


class Clock:
    """Wall-clock seconds; tests use :class:`FakeClock`."""

    def time(self) -> float:
        return time.time()


class FakeClock(Clock):
    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.now = start

    def time(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
