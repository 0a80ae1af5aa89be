"""The llm's prompt-cache counters: how much of each prompt llama.cpp did not evaluate again.

llama.cpp reuses the longest common prefix of the new prompt and the state it holds: the live
KV cache of its last request or, with the RAM prompt cache on, a saved state that it loads
first. Watching `Llama.generate` sees the state after that load and before the evaluation, so
the prefix it shares with the prompt is exactly what is reused.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

#: A request counts as a hit when at least this share of its prompt was reused.
HIT_SHARE = 0.5


class CacheStats:
    """Thread-safe counters of prompt tokens evaluated and reused, for `GET /health`."""

    def __init__(self, size_mb: int) -> None:
        self.size_mb = size_mb
        self._lock = threading.Lock()
        self.requests = 0
        self.hits = 0
        self.prompt_tokens = 0
        self.cached_tokens = 0

    def record(self, prompt: int, reused: int) -> None:
        """One generation of `prompt` tokens of which `reused` came from the cache."""
        with self._lock:
            self.requests += 1
            self.prompt_tokens += prompt
            self.cached_tokens += reused
            if prompt and reused >= HIT_SHARE * prompt:
                self.hits += 1

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "enabled": self.size_mb > 0,
                "size_mb": self.size_mb,
                "requests": self.requests,
                "hits": self.hits,
                "prompt_tokens": self.prompt_tokens,
                "cached_tokens": self.cached_tokens,
            }


def shared_prefix(held: Sequence[int], prompt: Sequence[int]) -> int:
    """Tokens at the start of `prompt` that `held` already has."""
    n = 0
    for a, b in zip(held, prompt, strict=False):
        if a != b:
            break
        n += 1
    return n


def watch(llama: Any, stats: CacheStats) -> None:
    """Count, on each `llama.generate` call, the prompt prefix it finds already evaluated."""
    original: Callable[..., Iterator[int]] = llama.generate

    def generate(tokens: Sequence[int], *args: Any, **kwargs: Any) -> Iterator[int]:
        tokens = list(tokens)
        held: list[int] = llama._input_ids.tolist() if llama.n_tokens > 0 else []
        reused = shared_prefix(held, tokens)
        # a fully held prompt still evaluates its last token again to get fresh logits
        stats.record(len(tokens), min(reused, max(len(tokens) - 1, 0)))
        return original(tokens, *args, **kwargs)

    llama.generate = generate
