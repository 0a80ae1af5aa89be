"""Worker choice: least loaded relative to capacity, cool-downs, and the bounded wait queue.

Everything here runs on the event loop (no locks): in-flight counters are this coordinator's,
the reported load comes from heartbeats in the routing table.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import math
import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from rma.coordinator.errors import APIError
from rma.coordinator.registry import Registry, WorkerState
from rma.schemas.enums import WorkerStatus

Key = tuple[str, str]  # (worker id, service)
#: Seconds after a worker's new tunnel during which cool-downs heard from other coordinators are
#: ignored: they crossed the news of the tunnel (a relay to the dead holder failed meanwhile).
RENEWED_GRACE = 2.0


@dataclass(frozen=True, slots=True)
class Wish:
    """What a request asks of its worker: labels (``x-rma-prefer`` / ``x-rma-require``) and
    cache affinity (a conversation's key: the same worker while it is healthy and not overloaded).
    """

    prefer: tuple[tuple[str, str], ...] = ()
    require: tuple[tuple[str, str], ...] = ()
    affinity: str | None = None

    @staticmethod
    def matches(worker: WorkerState, pairs: tuple[tuple[str, str], ...]) -> bool:
        return all(worker.labels.get(k) == v for k, v in pairs)

    @staticmethod
    def parse(value: str, header: str) -> tuple[tuple[str, str], ...]:
        """``region=eu,gpu=4090`` -> pairs; a malformed value is a 400 naming the header."""
        pairs = []
        for part in value.split(","):
            key, eq, val = part.strip().partition("=")
            if not eq or not key.strip():
                raise APIError(
                    400, f"{header} must be KEY=VALUE[,KEY=VALUE...], not {value!r}", "bad_header"
                )
            pairs.append((key.strip(), val.strip()))
        return tuple(pairs)

    def describe(self, pairs: tuple[tuple[str, str], ...]) -> str:
        return ",".join(f"{k}={v}" for k, v in pairs)


class Lease:
    """One in-flight request on one worker; :meth:`release` is idempotent (use ``finally``)."""

    __slots__ = ("_balancer", "_released", "key", "service", "worker")

    def __init__(self, balancer: Balancer, worker: WorkerState, service: str) -> None:
        self._balancer = balancer
        self.worker = worker
        self.service = service
        self.key: Key = (worker.id, service)
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._balancer._release(self)


def _rendezvous(key: str, worker_id: str) -> int:
    digest = hashlib.blake2b(f"{key}\0{worker_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def busy(worker: WorkerState) -> float:
    """How busy the worker's host is, 0..1: the larger of its CPU and GPU utilization."""
    load = worker.load
    cpu = load.cpu_percent / 100  # the whole machine's (psutil.cpu_percent)
    gpu = (load.gpu_percent or 0.0) / 100
    return min(1.0, max(cpu, gpu))


class Balancer:
    def __init__(
        self,
        registry: Registry,
        *,
        capacity: int,
        queue_size: int,
        queue_timeout: float,
        cooldown_base: float,
        cooldown_max: float,
        reachable: Callable[[WorkerState], bool] = lambda w: True,
        clock: Callable[[], float] = time.monotonic,
        service_capacity: Callable[[str], int | None] = lambda service: None,
        affinity_load_factor: float = 1.25,
        priority_aging: float = 1.0,
    ) -> None:
        self.registry = registry
        #: Cache affinity's bound: a worker takes a conversation while its load stays within this
        #: factor of the average; 0 turns affinity off.
        self.affinity_load_factor = affinity_load_factor
        self.service_capacity = service_capacity
        self.capacity = capacity
        self.queue_size = queue_size
        self.queue_timeout = queue_timeout
        self.cooldown_base = cooldown_base
        self.cooldown_max = cooldown_max
        self.reachable = reachable
        self.clock = clock
        self.inflight: dict[Key, int] = {}
        self.cool_until: dict[Key, float] = {}
        self.failures: dict[Key, int] = {}
        self.waiters: dict[str, deque[asyncio.Future[None]]] = {}
        #: A waiter's priority and when it started waiting (``_wake`` serves the highest
        #: ``priority + priority_aging x seconds waited`` first: see docs/trust.md).
        self.rank: dict[asyncio.Future[None], tuple[float, float]] = {}
        self.priority_aging = priority_aging
        self.queued = 0
        #: Workers that refused a connection: worker id -> its last heartbeat time then.  Out of
        #: routing until a newer heartbeat (not for the whole offline window).
        self.unreachable: dict[str, float | None] = {}
        #: Told of every cool-down this coordinator gives (worker id, service, seconds) and of
        #: every one it lifts on a success (seconds 0): how the others learn of them
        #: (:mod:`rma.coordinator.cluster.cooldowns`).  Called on the event loop; must not block.
        self.on_cool: list[Callable[[str, str, float], None]] = []
        #: Coordinators that share each worker's capacity (``split_capacity``): this one's
        #: share is ``capacity // split``, at least 1.  Set from the cluster's thread.
        self.split = 1
        #: Worker id -> when its transport was renewed (:meth:`forget`): cool-downs heard from
        #: other coordinators within ``RENEWED_GRACE`` of it are about the old one.
        self.renewed: dict[str, float] = {}

    # --- choosing ---------------------------------------------------------------------------------

    def workers_for(self, service: str) -> list[WorkerState]:
        """Workers that run ``service`` healthy and that a transport can reach now.

        When no online worker does, a draining one that still holds the service (it has not
        handed it over yet: the scheduler lets go once a replacement is healthy) serves it, so a
        drain never leaves a gap.
        """
        found = [w for w in self.registry.routable(service) if self._usable(w)]
        if found:
            return found
        return [
            w
            for w in self.registry.all()
            if w.status is WorkerStatus.DRAINING
            and not w.quarantined
            and service in w.assignments
            and (st := w.services.get(service)) is not None
            and st.healthy
            and self._usable(w)
        ]

    def _usable(self, worker: WorkerState) -> bool:
        """A transport reaches it, and it was not found unreachable since its last heartbeat."""
        return self.reachable(worker) and (not self.unreachable or self._heard(worker))

    def _heard(self, worker: WorkerState) -> bool:
        """False while ``worker`` is marked unreachable and has not sent a heartbeat since."""
        if worker.id not in self.unreachable:
            return True
        if self.unreachable[worker.id] == worker.last_heartbeat_at:
            return False
        del self.unreachable[worker.id]  # a newer heartbeat: back in routing
        return True

    def mark_unreachable(self, worker: WorkerState) -> None:
        """Take ``worker`` out of routing at once, until its next heartbeat."""
        self.unreachable[worker.id] = worker.last_heartbeat_at

    def forget(self, worker_id: str) -> int:
        """Lift every cool-down and the unreachable mark of ``worker_id``: its transport is new
        (its tunnel attached here or to another coordinator), so what the old one did is past.

        Returns how many marks were lifted.
        """
        now = self.clock()
        renewed = self.renewed
        renewed.pop(worker_id, None)
        renewed[worker_id] = now  # in time order: the oldest first
        for ident, when in list(itertools.islice(renewed.items(), 8)):
            if now - when < RENEWED_GRACE:
                break
            del renewed[ident]
        # The worker's own services (not a scan of every cool-down: a restarted coordinator
        # hears of thousands of tunnels at once).
        state = self.registry.get(worker_id)
        services = {*state.services, *state.assignments} if state is not None else set()
        lifted = 0
        for service in services:
            key = (worker_id, service)
            self.failures.pop(key, None)
            if self.cool_until.pop(key, None) is not None:
                lifted += 1
        if worker_id in self.unreachable:
            del self.unreachable[worker_id]
            lifted += 1
        return lifted

    def cool(self, worker_id: str, service: str, seconds: float) -> None:
        """Another coordinator cooled this worker's service down for ``seconds`` (0: it served
        there again, so the cool-down is lifted here too).  Never told on to the others; ignored
        within ``RENEWED_GRACE`` of the worker's new tunnel."""
        key = (worker_id, service)
        if seconds <= 0:
            self.cool_until.pop(key, None)
            self.failures.pop(key, None)
            return
        now = self.clock()
        if now - self.renewed.get(worker_id, -math.inf) < RENEWED_GRACE:
            return  # sent before the sender heard of the new tunnel: its old transport failed
        until = now + min(seconds, self.cooldown_max)
        if self.cool_until.get(key, 0.0) < until:
            self.cool_until[key] = until

    def cooling_now(self) -> dict[Key, float]:
        """Every cool-down still running: key -> seconds left (for the metrics)."""
        now = self.clock()
        return {key: until - now for key, until in self.cool_until.items() if until > now}

    def capacity_of(self, worker: WorkerState, service: str = "") -> int:
        """Requests one copy of ``service`` takes at once from this coordinator: the catalog's
        ``capacity``, else the gateway's default (``worker_capacity``); with ``split_capacity``,
        this coordinator's share of it (divided by the live coordinators, at least 1)."""
        cap = self.service_capacity(service) if service else None
        if cap is None:
            cap = self.capacity
        split = self.split
        return cap if split <= 1 else max(1, cap // split)

    def least_loaded(self, services: list[str]) -> str:
        """Of several services answering to one model, the one with the most room now.

        Room is this coordinator's in-flight count against the capacity of the healthy copies;
        a tie is broken at random (so idle services share the traffic); services nobody runs
        healthy are never chosen unless none runs (then the first, so the 503 names it).
        """
        if len(services) == 1:
            return services[0]
        best: list[str] = []
        best_score = math.inf
        for service in services:
            workers = self.workers_for(service)
            if not workers:
                continue
            cap = sum(self.capacity_of(w, service) for w in workers)
            used = sum(self.inflight.get((w.id, service), 0) for w in workers)
            score = used / cap
            if score < best_score:
                best, best_score = [service], score
            elif score == best_score:
                best.append(service)
        if not best:
            return services[0]
        return best[0] if len(best) == 1 else random.choice(best)

    def cooling(self, key: Key, now: float) -> bool:
        until = self.cool_until.get(key)
        return until is not None and until > now

    def pick(
        self,
        service: str,
        exclude: set[str],
        trusted_only: bool = False,
        wish: Wish | None = None,
    ) -> WorkerState | bool | None:
        """The best worker; ``None`` when no untried worker is left; ``False`` when all are full.

        Raises 503 when no worker runs the service at all (no trusted one, with ``trusted_only``;
        none with the required labels, with ``wish.require``).  Workers with the preferred
        labels are chosen first while one has room; the others after them.
        """
        every = self.workers_for(service)
        if trusted_only:
            every = [w for w in every if w.trusted]
            if not every:
                raise APIError(
                    503,
                    f"no trusted worker is running service {service!r} right now "
                    "(the request asked for trusted workers only: x-rma-trusted)",
                    "no_trusted_worker",
                )
        if not every:
            raise APIError(
                503,
                f"no worker is running service {service!r} right now; try again later",
                "no_worker",
            )
        if wish is not None and wish.require:
            every = [w for w in every if wish.matches(w, wish.require)]
            if not every:
                raise APIError(
                    503,
                    f"no worker labelled {wish.describe(wish.require)} is running service "
                    f"{service!r} right now (the request requires it: x-rma-require)",
                    "no_matching_worker",
                )
        if wish is not None and wish.prefer:
            preferred = [w for w in every if wish.matches(w, wish.prefer)]
            if preferred and len(preferred) < len(every):
                choice = self._choose(service, preferred, exclude, wish.affinity)
                if isinstance(choice, WorkerState):
                    return choice
        return self._choose(service, every, exclude, wish.affinity if wish else None)

    def _load(self, w: WorkerState, service: str) -> int:
        status = w.services.get(service)
        reported = status.inflight if status is not None else 0
        return max(self.inflight.get((w.id, service), 0), reported)

    def _affine(self, service: str, pool: list[WorkerState], key: str) -> WorkerState | None:
        """The conversation's worker: rendezvous hashing with bounded load.

        Workers are ranked by ``hash(key, worker)`` (the same order for one key while the set of
        workers stays; a worker leaving moves only its own keys); the first whose load stays within
        ``affinity_load_factor`` x the average (+1 for this request) and below its capacity is it.
        Overload spills to the next one in the key's order, so a hot conversation does not pile up.
        """
        total = sum(self._load(w, service) for w in pool) + 1
        bound = math.ceil(total / len(pool) * self.affinity_load_factor)
        ranked = sorted(pool, key=lambda w: _rendezvous(key, w.id), reverse=True)
        for w in ranked:
            load = self._load(w, service)
            if load + 1 <= bound and self.inflight.get((w.id, service), 0) < self.capacity_of(
                w, service
            ):
                return w
        return None

    def _choose(
        self,
        service: str,
        every: list[WorkerState],
        exclude: set[str],
        affinity: str | None = None,
    ) -> WorkerState | bool | None:
        """The conversation's worker (``affinity``), else the least loaded of ``every``."""
        now = self.clock()
        warm = [w for w in every if not self.cooling((w.id, service), now)]
        # Never cool a service down to zero capacity: when all are cooling, all may serve.
        pool = [w for w in (warm or every) if w.id not in exclude]
        if not pool:
            return None
        if affinity is not None and self.affinity_load_factor > 0:
            chosen = self._affine(service, pool, affinity)
            if chosen is not None:
                return chosen
        best: list[WorkerState] = []
        best_score = math.inf
        for w in pool:
            cap = self.capacity_of(w, service)
            mine = self.inflight.get((w.id, service), 0)
            if mine >= cap:
                continue
            status = w.services.get(service)
            reported = status.inflight if status is not None else 0
            # The worker's own count includes ours (and other coordinators'), but is as old as
            # its last heartbeat; ours is live: the larger of the two.  A busy host (CPU or GPU,
            # from the heartbeat) weighs in as a tie-breaker of up to one tenth.
            score = max(mine, reported) / cap + 0.1 * busy(w)
            if score < best_score:
                best_score = score
                best = [w]
            elif score == best_score:
                best.append(w)
        if not best:
            return False
        return best[0] if len(best) == 1 else random.choice(best)

    async def acquire(
        self,
        service: str,
        exclude: set[str],
        trusted_only: bool = False,
        wish: Wish | None = None,
        priority: float = 0.0,
    ) -> Lease | None:
        """A lease on the best worker, waiting in the queue while every worker is at capacity.

        ``None`` when every worker was tried already.  429 when the queue is full or the wait
        times out; 503 when no worker runs the service.  A freed slot goes to the waiter with
        the highest ``priority`` (the key owner's credits) plus its aging.
        """
        waiting = self.waiters.get(service)
        if not waiting:  # nobody queued ahead of us
            choice = self.pick(service, exclude, trusted_only, wish)
            if choice is None:
                return None
            if isinstance(choice, WorkerState):
                return self._take(choice, service)
        return await self._wait(service, exclude, trusted_only, wish, priority)

    async def _wait(
        self,
        service: str,
        exclude: set[str],
        trusted_only: bool,
        wish: Wish | None = None,
        priority: float = 0.0,
    ) -> Lease | None:
        if self.queued >= self.queue_size:
            raise self._saturated(service, "the wait queue is full")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.queue_timeout
        queue = self.waiters.setdefault(service, deque())
        self.queued += 1
        front = False
        since = loop.time()  # kept across wake-ups: the wait ages from the first
        try:
            while True:
                fut: asyncio.Future[None] = loop.create_future()
                self.rank[fut] = (priority, since)
                if front:
                    queue.appendleft(fut)
                else:
                    queue.append(fut)
                remaining = deadline - loop.time()
                try:
                    # Wake on a released slot; re-check now and then for new workers.
                    async with asyncio.timeout(min(remaining, 1.0)):
                        await fut
                except TimeoutError:
                    if loop.time() >= deadline:
                        raise self._saturated(
                            service, f"no capacity freed within {self.queue_timeout:g} s"
                        ) from None
                finally:
                    if not fut.done():
                        fut.cancel()
                    self.rank.pop(fut, None)
                    with contextlib.suppress(ValueError):
                        queue.remove(fut)
                choice = self.pick(service, exclude, trusted_only, wish)
                if choice is None:
                    return None
                if isinstance(choice, WorkerState):
                    return self._take(choice, service)
                front = True
        finally:
            self.queued -= 1
            if not queue:
                self.waiters.pop(service, None)
            else:
                self._wake(service)  # pass a wake-up we may have swallowed on

    def _saturated(self, service: str, why: str) -> APIError:
        retry = max(1, math.ceil(min(self.queue_timeout, 5.0)))
        return APIError(
            429,
            f"every worker running {service!r} is at capacity and {why}; retry later",
            "saturated",
            headers={"Retry-After": str(retry)},
        )

    # --- bookkeeping ------------------------------------------------------------------------------

    def take(self, worker: WorkerState, service: str) -> Lease:
        """A lease on this very worker, past its capacity if need be (a canary: no choice)."""
        return self._take(worker, service)

    def _take(self, worker: WorkerState, service: str) -> Lease:
        lease = Lease(self, worker, service)
        self.inflight[lease.key] = self.inflight.get(lease.key, 0) + 1
        return lease

    def _release(self, lease: Lease) -> None:
        n = self.inflight.get(lease.key, 0) - 1
        if n > 0:
            self.inflight[lease.key] = n
        else:
            self.inflight.pop(lease.key, None)
        self._wake(lease.service)

    def _wake(self, service: str) -> None:
        queue = self.waiters.get(service)
        if not queue:
            return
        now = asyncio.get_running_loop().time()
        best: asyncio.Future[None] | None = None
        best_score = -math.inf
        for fut in queue:  # in arrival order: a tie goes to the first
            if fut.done():
                continue
            priority, since = self.rank.get(fut, (0.0, now))
            score = priority + self.priority_aging * (now - since)
            if score > best_score:
                best, best_score = fut, score
        if best is not None:
            best.set_result(None)

    def failed(self, worker: WorkerState, service: str) -> float:
        """Cool the worker down (5 s doubling to 60 s), unless it is the service's only one.

        Returns the cool-down in seconds (0 when none was applied).
        """
        key = (worker.id, service)
        others = [w for w in self.workers_for(service) if w.id != worker.id]
        if not others:
            return 0.0  # and no count either: a later second worker must not inherit a 60 s
        n = self.failures.get(key, 0) + 1
        self.failures[key] = n
        seconds = min(self.cooldown_base * 2.0 ** (n - 1), self.cooldown_max)
        self.cool_until[key] = self.clock() + seconds
        for hook in self.on_cool:
            hook(worker.id, service, seconds)
        return seconds

    def succeeded(self, worker: WorkerState, service: str) -> None:
        key = (worker.id, service)
        if key in self.failures or key in self.cool_until:
            self.failures.pop(key, None)
            self.cool_until.pop(key, None)
            for hook in self.on_cool:
                hook(worker.id, service, 0.0)

    # --- metrics ----------------------------------------------------------------------------------

    def inflight_by_service(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for (_, service), n in self.inflight.items():
            out[service] = out.get(service, 0) + n
        return out

    def queued_by_service(self) -> dict[str, int]:
        return {s: sum(1 for f in q if not f.done()) for s, q in self.waiters.items()}
