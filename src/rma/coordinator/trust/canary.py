"""Chat verification: canary prompts with a checkable answer, and speed suspicion.

Two honest LLM answers differ, so chat and completions services (catalog ``verify =
"canary"``) are not verified by comparing two workers.  Instead, after a client request that a
worker served (with the worker's verification chance x ``canary_rate``), the verifier sends
that same worker, off the client's path, a **canary**: a chat request whose answer it can check
("What is 17 + 25? Answer with the number only." must contain 42).  A right answer is a
verified result that agreed; a wrong one a disagreement (and maybe a quarantine).

**Speed suspicion**: an answer of at least ``speed_min_tokens`` completion tokens delivered
faster than the worker's hardware class can (``speed_limit_gpu`` / ``_service`` / ``_data``
tokens per second, by tier) counts as a disagreement too: a worker that makes up its answers
is faster than one that computes them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import re
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from rma.coordinator.gateway.upstream import UpstreamError, UpstreamRequest
from rma.coordinator.registry import WorkerState
from rma.coordinator.trust import reputation
from rma.coordinator.trust.compare import Comparison
from rma.settings import CoordinatorSettings

if TYPE_CHECKING:
    from rma.coordinator.trust.verifier import Verifier

log = logging.getLogger("rma.trust")

CHAT_PATH = "/v1/chat/completions"


@dataclass(frozen=True, slots=True)
class Canary:
    prompt: str
    expected: str

    def check(self, body: bytes) -> Comparison:
        """Whether the answer (an OpenAI chat or text completion) contains the expected number."""
        text = answer_text(body)
        if text is None:
            return Comparison(False, 0.0, "the canary's answer is not a completion")
        if re.search(rf"(?<![\d.]){re.escape(self.expected)}(?![\d])", text):
            return Comparison(True, 1.0, f"canary answered {self.expected}")
        shown = text.strip()[:80]
        return Comparison(False, 0.0, f"canary expected {self.expected}, got {shown!r}")


def make_canary(rng: random.Random) -> Canary:
    a, b = rng.randint(11, 99), rng.randint(11, 99)
    return Canary(f"What is {a} + {b}? Answer with the number only.", str(a + b))


def answer_text(body: bytes) -> str | None:
    try:
        doc = json.loads(body)
        choice = doc["choices"][0]
    except (ValueError, RecursionError, KeyError, IndexError, TypeError):
        return None
    if not isinstance(choice, dict):
        return None
    message = choice.get("message")
    text = message.get("content") if isinstance(message, dict) else choice.get("text")
    return text if isinstance(text, str) else None


def speed_limit(worker: WorkerState, settings: CoordinatorSettings) -> float:
    """Completion tokens per second beyond which this worker's answers are suspect."""
    return {1: settings.speed_limit_gpu, 2: settings.speed_limit_service}.get(
        worker.tier, settings.speed_limit_data
    )


class Canaries:
    """The verifier's chat checks (``verifier.canaries``)."""

    def __init__(self, verifier: Verifier) -> None:
        self.verifier = verifier
        self.settings = verifier.settings
        self.random = verifier.random

    def served(
        self, worker: WorkerState, service: str, seconds: float, completion_tokens: int
    ) -> None:
        """A client request that ``worker`` answered (the gateway's accounting calls it)."""
        v = self.verifier
        spec = v.pool.catalog.get(service)
        if spec is None or spec.verify != "canary" or worker.trusted:
            return
        s = self.settings
        if completion_tokens >= s.speed_min_tokens and seconds > 0:
            rate = completion_tokens / seconds
            limit = speed_limit(worker, s)
            if limit > 0 and rate > limit:
                detail = f"{rate:.0f} completion tokens/s, over the tier's {limit:g}"
                self._spawn(self._suspect(worker, service, detail, rate))
                return
        if s.canary_rate <= 0 or len(v.tasks) >= s.verify_max_pending:
            return
        if self.random.random() < reputation.chance(worker, s) * s.canary_rate:
            self._spawn(self._canary(worker, service))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self.verifier.tasks.add(task)
        task.add_done_callback(self.verifier.tasks.discard)

    async def _suspect(self, worker: WorkerState, service: str, detail: str, rate: float) -> None:
        log.warning(
            "verification: %s on %s is suspiciously fast (%s)", service, worker.name, detail
        )
        await self._verdict(worker, service, Comparison(False, 0.0, detail), "speed", rate=rate)

    async def _canary(self, worker: WorkerState, service: str) -> None:
        try:
            body = await self._ask(worker, service, canary := make_canary(self.random))
            if body is None:
                return  # no answer: no verdict (failures are the balancer's business)
            verdict = canary.check(body)
            if not verdict.agree:
                log.warning(
                    "verification: %s on %s failed a canary (%s)", service, worker.name,
                    verdict.detail,
                )  # fmt: skip
            await self._verdict(worker, service, verdict, "canary", prompt=canary.prompt)
        except asyncio.CancelledError:
            raise
        except Exception:  # a canary never takes the gateway down
            log.exception("canary for %s on %s failed", service, worker.name)

    async def _ask(self, worker: WorkerState, service: str, canary: Canary) -> bytes | None:
        v = self.verifier
        gw = v.gateway
        spec = v.pool.catalog.get(service)
        if spec is None or not worker.serves(service):
            return None
        upstream = gw.upstream_for(worker)
        if upstream is None:
            return None
        payload = {
            "model": spec.models[0] if spec.models else service,
            "messages": [{"role": "user", "content": canary.prompt}],
            "max_tokens": 16,
            "temperature": 0,
            "stream": False,
        }
        body = json.dumps(payload).encode()
        headers = [("content-type", "application/json"), ("content-length", str(len(body)))]
        request = UpstreamRequest(service, "POST", CHAT_PATH, headers, body)
        s = self.settings
        lease = gw.balancer.take(worker, service)  # it counts towards the worker's capacity
        try:
            async with asyncio.timeout(s.total_timeout):
                resp = await upstream.open(worker, request, first_byte_timeout=s.first_byte_timeout)
                try:
                    chunks = [c async for c in resp.aiter_bytes()]
                finally:
                    with contextlib.suppress(Exception):
                        await resp.aclose()
        except (UpstreamError, TimeoutError):
            return None
        finally:
            lease.release()
        if resp.status != 200:
            return None
        return b"".join(chunks)[: s.verify_max_bytes]

    async def _verdict(
        self, worker: WorkerState, service: str, verdict: Comparison, against: str, **extra: object
    ) -> None:
        v = self.verifier
        with v.pool.registry.lock:
            if verdict.agree:
                reputation.agreed(worker)
            else:
                reputation.disagreed(worker)
        await asyncio.to_thread(v.pool.save_verification, worker)
        if not verdict.agree:
            await v.blame(worker, service, verdict, against, False, check=against, **extra)
