"""Jitter and exponential backoff, used by every loop of the agent."""

from __future__ import annotations

import random
from dataclasses import dataclass


def jittered(seconds: float, fraction: float = 0.1) -> float:
    """``seconds`` give or take ``fraction`` of it, so a fleet of agents does not beat in step."""
    return max(0.0, seconds * (1 + random.uniform(-fraction, fraction)))


@dataclass
class Backoff:
    """``base``, doubling up to ``cap``, each with jitter; :meth:`reset` after a success."""

    base: float = 1.0
    cap: float = 60.0
    factor: float = 2.0
    jitter: float = 0.2
    attempts: int = 0

    def next(self) -> float:
        delay = min(self.cap, self.base * self.factor**self.attempts)
        self.attempts += 1
        return jittered(delay, self.jitter)

    def reset(self) -> None:
        self.attempts = 0
