"""Verification: re-run a request on another worker and compare, off the client's path or, on
``x-rma-verify: quorum``, before the client gets an agreeing answer.

The gateway wraps its ``send`` with :meth:`Verifier.watch`; the wrapper holds back a copy of a
complete, non-streamed 200 answer (at most ``verify_max_bytes``) of a service whose catalog entry
says ``verify = ...``, with the worker's current chance (``reputation.chance``), and once the
client has the last byte a background task runs the request again on a second worker (a trusted
one when there is one) and compares.  Who is wrong: against a trusted worker, the untrusted one;
between two untrusted ones, a third run on another worker breaks the tie.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from starlette.types import Message, Scope, Send

from rma.coordinator.errors import APIError
from rma.coordinator.gateway.asgi import header
from rma.coordinator.gateway.headers import response_header_allowed
from rma.coordinator.gateway.upstream import UpstreamError, UpstreamRequest
from rma.coordinator.registry import WorkerState
from rma.coordinator.trust import reputation
from rma.coordinator.trust.canary import Canaries
from rma.coordinator.trust.compare import Comparator, Comparison, comparator_for

#: The catalog's ``verify`` value for chat/completions services (canaries, speed suspicion).
CANARY = "canary"

if TYPE_CHECKING:
    from rma.coordinator.gateway.proxy import Gateway

log = logging.getLogger("rma.trust")

#: Response headers not passed back from a quorum answer (length and framing are ours).
_DROP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"trailers",
        b"transfer-encoding",
        b"upgrade",
        b"date",
        b"server",
        b"content-length",
    }
)


#: Seconds between two ``verification_failed`` events of one service.
_UNDECIDED_EVERY = 10.0


class CallLike(Protocol):
    """The gateway's bookkeeping of one client request (``proxy._Call``)."""

    worker: WorkerState | None
    status: int
    attempts: int
    tail: bytes


@dataclass(slots=True)
class Answer:
    """One worker's complete answer to the request."""

    worker: WorkerState
    status: int
    headers: list[tuple[str, str]]
    body: bytes


class _Capture:
    """A ``send`` that passes everything on and keeps a bounded copy of the body."""

    __slots__ = ("_send", "call", "chunks", "off", "request", "size", "verifier")

    def __init__(
        self, verifier: Verifier, call: CallLike, request: UpstreamRequest, send: Send
    ) -> None:
        self.verifier = verifier
        self.call = call
        self.request = request
        self._send = send
        self.chunks: list[bytes] = []
        self.size = 0
        self.off = False

    async def __call__(self, message: Message) -> None:
        await self._send(message)
        if self.off:
            return
        if message["type"] == "http.response.start":
            self.off = not self.verifier.wanted(message, self.call.worker)
            return
        if message["type"] != "http.response.body":
            return
        chunk: bytes = message.get("body", b"")
        self.size += len(chunk)
        if self.size > self.verifier.settings.verify_max_bytes:
            self.off, self.chunks = True, []
            return
        if chunk:
            self.chunks.append(chunk)
        if not message.get("more_body", False):
            self.off = True  # once
            worker = self.call.worker
            if worker is not None:
                self.verifier.submit(self.request, worker, b"".join(self.chunks))
            self.chunks = []


class Verifier:
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.pool = gateway.pool
        self.settings = gateway.settings
        self.tasks: set[asyncio.Task[None]] = set()
        self.random = random.Random()
        #: service -> when its last ``verification_failed`` event went out (loop clock)
        self._undecided_at: dict[str, float] = {}
        self.canaries = Canaries(self)  # chat: canary prompts and speed suspicion

    # --- the hooks in the gateway -----------------------------------------------------------------

    def comparator(self, service: str) -> Comparator | None:
        spec = self.pool.catalog.get(service)
        if spec is None or spec.verify is None or spec.verify == CANARY:
            return None  # canary: checked by trust/canary.py, not by comparing two answers
        return comparator_for(spec.verify)

    def watch(self, call: CallLike, request: UpstreamRequest, send: Send) -> Send:
        """``send``, or a wrapper that verifies the answer after the client has it."""
        if self.settings.verify_max_bytes <= 0 or self.comparator(request.service) is None:
            return send
        return _Capture(self, call, request, send)

    def wanted(self, start: Message, worker: WorkerState | None) -> bool:
        """Whether to hold back this answer: a 200, not a stream, and the worker's chance."""
        if worker is None or worker.trusted or start.get("status") != 200:
            return False
        for k, v in start.get("headers", []):
            if k == b"content-type" and v.startswith(b"text/event-stream"):
                return False
        if len(self.tasks) >= self.settings.verify_max_pending:
            return False
        return self.random.random() < reputation.chance(worker, self.settings)

    def submit(self, request: UpstreamRequest, worker: WorkerState, body: bytes) -> None:
        if len(self.tasks) >= self.settings.verify_max_pending:
            return
        task = asyncio.ensure_future(self._verify(request, Answer(worker, 200, [], body)))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def aclose(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        for task in list(self.tasks):
            with contextlib.suppress(BaseException):
                await task

    # --- background verification ------------------------------------------------------------------

    async def _verify(self, request: UpstreamRequest, first: Answer) -> None:
        compare = self.comparator(request.service)
        if compare is None:
            return
        try:
            second = await self.run(request, {first.worker.id})
            if second is None:
                return  # nobody to compare with: no verdict
            await self.judge(request, compare, first, second)
        except asyncio.CancelledError:
            raise
        except Exception:  # a verification never takes the gateway down
            log.exception("verification of %s on %s failed", request.service, first.worker.name)

    # --- running a request on a chosen worker -----------------------------------------------------

    async def run(
        self,
        request: UpstreamRequest,
        exclude: set[str],
        prefer_trusted: bool = True,
        any_status: bool = False,
    ) -> Answer | None:
        """The request's complete answer from a worker not in ``exclude`` (a trusted one when
        there is one and ``prefer_trusted``); ``None`` when no other worker answered 200 (or,
        with ``any_status``, anything but 502/503)."""
        gw = self.gateway
        s = self.settings
        service = request.service
        tried = set(exclude)
        others = [w for w in gw.balancer.workers_for(service) if w.id not in tried]
        trusted_only = prefer_trusted and any(w.trusted for w in others)
        for _ in range(s.max_attempts):
            try:
                lease = await gw.balancer.acquire(service, tried, trusted_only)
            except APIError:
                lease = None
            if lease is None:
                if trusted_only:
                    trusted_only = False
                    continue
                return None
            worker = lease.worker
            tried.add(worker.id)
            try:
                upstream = gw.upstream_for(worker)
                if upstream is None:
                    continue
                async with asyncio.timeout(s.total_timeout):
                    resp = await upstream.open(
                        worker, request, first_byte_timeout=s.first_byte_timeout
                    )
                    try:
                        body = await _read(resp.aiter_bytes(), s.verify_max_bytes)
                    finally:
                        with contextlib.suppress(Exception):
                            await resp.aclose()
                if body is None or resp.status in (502, 503):
                    continue
                if resp.status != 200 and not any_status:
                    continue
                return Answer(worker, resp.status, list(resp.headers), body)
            except (UpstreamError, TimeoutError):
                continue
            finally:
                lease.release()
        return None

    # --- who is wrong -----------------------------------------------------------------------------

    async def judge(
        self, request: UpstreamRequest, compare: Comparator, a: Answer, b: Answer
    ) -> Answer | None:
        """Compare two answers, record the verdict; the answer found right (``None``: none)."""
        verdict = compare(a.body, b.body)
        if verdict.agree:
            await self._record(request, agreed=[a, b])
            return b if b.worker.trusted else a
        if a.worker.trusted != b.worker.trusted:
            right, wrong = (a, b) if a.worker.trusted else (b, a)
            await self._record(request, agreed=[], wrong=[(wrong, right, verdict)])
            return right
        c = await self.run(request, {a.worker.id, b.worker.id})
        if c is None:
            await self._undecided(request, [a, b], verdict, "no third worker to break the tie")
            return None
        ca, cb = compare(a.body, c.body), compare(b.body, c.body)
        if ca.agree and not cb.agree:
            await self._record(request, agreed=[a, c], wrong=[(b, c, cb)])
            return a
        if cb.agree and not ca.agree:
            await self._record(request, agreed=[b, c], wrong=[(a, c, ca)])
            return b
        await self._undecided(request, [a, b, c], verdict, "no two answers agree")
        return None

    async def _record(
        self,
        request: UpstreamRequest,
        agreed: list[Answer],
        wrong: list[tuple[Answer, Answer, Comparison]] = (),  # type: ignore[assignment]
    ) -> None:
        lock = self.pool.registry.lock
        changed: list[WorkerState] = []
        with lock:
            for ans in agreed:
                reputation.agreed(ans.worker)
                changed.append(ans.worker)
            for ans, _, _ in wrong:
                reputation.disagreed(ans.worker)
                changed.append(ans.worker)
        for w in changed:
            await asyncio.to_thread(self.pool.save_verification, w)
        for ans, other, verdict in wrong:
            log.warning(
                "verification: %s on %s disagrees with %s (%s)",
                request.service, ans.worker.name, other.worker.name, verdict.detail,
            )  # fmt: skip
            await self.blame(
                ans.worker, request.service, verdict, other.worker.name, other.worker.trusted
            )

    async def blame(
        self,
        w: WorkerState,
        service: str,
        verdict: Comparison,
        against: str,
        against_trusted: bool,
        **extra: Any,
    ) -> None:
        """Quarantine ``w`` when its last wrong result took its reputation below the
        threshold; the event carries the evidence."""
        if not reputation.should_quarantine(w, self.settings):
            return
        evidence: dict[str, Any] = {
            "service": service,
            "reputation": round(w.reputation, 4),
            "verified": w.verified,
            "disagreements": w.disagreements,
            "against": against,
            "against_trusted": against_trusted,
            "detail": verdict.detail,
            "score": round(verdict.score, 4),
            "threshold": self.settings.quarantine_threshold,
            **extra,
        }
        message = (
            f"worker {w.name} is quarantined: reputation {w.reputation:.2f} below "
            f"{self.settings.quarantine_threshold:g} after {w.disagreements} wrong of "
            f"{w.verified} verified results ({service}: {verdict.detail} against {against})"
        )
        with contextlib.suppress(APIError):
            await asyncio.to_thread(self.pool.set_quarantined, w.id, True, message, evidence)

    async def _undecided(
        self, request: UpstreamRequest, answers: list[Answer], verdict: Comparison, why: str
    ) -> None:
        names = [a.worker.name for a in answers]
        log.warning("verification: %s undecided between %s (%s)", request.service, names, why)
        now = asyncio.get_running_loop().time()
        last = self._undecided_at.get(request.service)
        if last is not None and now - last < _UNDECIDED_EVERY:
            return  # at most one event per service every _UNDECIDED_EVERY seconds
        self._undecided_at[request.service] = now
        await asyncio.to_thread(
            self.pool.events.emit,
            "verification_failed",
            f"{request.service}: answers of {', '.join(names)} disagree and {why}",
            None,
            {"service": request.service, "workers": names, "detail": verdict.detail},
        )

    # --- quorum on request ------------------------------------------------------------------------

    @staticmethod
    def quorum_wanted(scope: Scope) -> bool:
        raw = header(scope, b"x-rma-verify")
        if raw is None:
            return False
        value = raw.decode("latin-1").strip().lower()
        if value == "quorum":
            return True
        raise APIError(400, f"x-rma-verify must be 'quorum', not {value!r}", "invalid_header")

    async def quorum(self, call: CallLike, request: UpstreamRequest, send: Send) -> None:
        """Answer only what two workers agree on; a disagreement gets a third run; 502
        ``verification_failed`` when none agree (or no second worker could answer)."""
        compare = self.comparator(request.service)
        if compare is None:
            raise APIError(
                400,
                f"service {request.service!r} declares no comparator (catalog `verify`): "
                "it cannot answer with x-rma-verify: quorum",
                "not_verifiable",
            )
        if _streamed(request.body):
            raise APIError(
                400, "x-rma-verify: quorum answers are not streamed: send stream false",
                "quorum_stream",
            )  # fmt: skip
        first = await self.run(request, set(), prefer_trusted=False, any_status=True)
        call.attempts += 1
        if first is None:
            raise APIError(
                502, f"service {request.service!r}: no worker answered", "upstream_failed"
            )
        call.worker = first.worker
        if first.status != 200:  # the request's own error (4xx): nothing to verify
            call.status = first.status
            await _send_answer(send, first)
            return
        second = await self.run(request, {first.worker.id})
        call.attempts += 1
        if second is None:
            raise APIError(
                502,
                f"service {request.service!r}: no second worker answered, so the answer "
                "could not be verified",
                "verification_failed",
            )
        right = await self.judge(request, compare, first, second)
        if right is None:
            raise APIError(
                502,
                f"service {request.service!r}: the workers' answers disagree",
                "verification_failed",
            )
        call.worker = right.worker
        call.status = right.status
        call.tail = right.body[-1024:]
        await _send_answer(send, right)


def _streamed(body: bytes) -> bool:
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        return False
    return isinstance(doc, dict) and doc.get("stream") is True


async def _read(chunks: Any, limit: int) -> bytes | None:
    out: list[bytes] = []
    size = 0
    async for chunk in chunks:
        size += len(chunk)
        if size > limit:
            return None
        out.append(chunk)
    return b"".join(out)


async def _send_answer(send: Send, answer: Answer) -> None:
    headers: list[tuple[bytes, bytes]] = []
    for k, v in answer.headers:
        try:
            name, value = k.lower().encode("latin-1"), v.encode("latin-1")
        except UnicodeEncodeError:
            continue
        if name in _DROP or not response_header_allowed(name, value):
            continue
        headers.append((name, value))
    headers.append((b"content-length", str(len(answer.body)).encode()))
    headers.append((b"x-rma-worker", answer.worker.name.encode("latin-1", "replace")))
    await send({"type": "http.response.start", "status": answer.status, "headers": headers})
    await send({"type": "http.response.body", "body": answer.body, "more_body": False})
