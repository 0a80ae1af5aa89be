"""Per-API-key requests-per-minute limits: a token bucket per key, in memory.

Several coordinators share one bucket per key through Redis instead
(``rma.coordinator.shared.SharedRateLimiter``, a subclass that falls back to this one).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from rma.coordinator.errors import APIError


def rate_limited(rpm: int, retry: int) -> APIError:
    """The 429 for a key over its ``rpm``, with ``Retry-After``."""
    return APIError(
        429,
        f"this API key is limited to {rpm} requests per minute; retry in {retry} s",
        "rate_limited",
        headers={"Retry-After": str(retry)},
    )


def retry_after(tokens: float, rpm: int) -> int:
    """Whole seconds until a bucket holding ``tokens`` has one again."""
    return max(1, math.ceil((1.0 - tokens) / (rpm / 60.0)))


class RateLimiter:
    """``rpm`` requests per minute per key, with bursts up to ``rpm``; ``rpm <= 0``: unlimited."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, updated at)

    def check(self, key_id: str, rpm: int) -> None:
        """Take one request from the key's bucket or raise 429 with ``Retry-After``."""
        if rpm <= 0:
            return
        now = self.clock()
        rate = rpm / 60.0
        tokens, updated = self._buckets.get(key_id, (float(rpm), now))
        tokens = min(float(rpm), tokens + (now - updated) * rate)
        if tokens < 1.0:
            self._buckets[key_id] = (tokens, now)
            raise rate_limited(rpm, retry_after(tokens, rpm))
        self._buckets[key_id] = (tokens - 1.0, now)

    async def acquire(self, key_id: str, rpm: int) -> None:
        """:meth:`check` as the gateway calls it (the shared limiter's may ask Redis)."""
        self.check(key_id, rpm)

    def forget(self, key_id: str) -> None:
        self._buckets.pop(key_id, None)
