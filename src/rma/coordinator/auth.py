"""Who is calling: admin, worker or client; failed attempts rate-limited per role and address."""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Annotated

from fastapi import Depends, Request
from fastapi.concurrency import run_in_threadpool

from rma.coordinator import security
from rma.coordinator.errors import APIError
from rma.coordinator.pool import Pool
from rma.coordinator.registry import WorkerState


class FailureLimiter:
    """Failed authentications, counted per *bucket*; a full bucket answers 429.

    A bucket is a role and an address (``admin|203.0.113.7``), an address over every role
    (``*|203.0.113.7``), or one join token (``join-token|<token id>``).  Role buckets hold
    ``limit`` failures per ``window`` seconds, address buckets ``address_limit``.

    Only a credential that does *not* verify is checked against the buckets: a valid credential
    is never refused because of failures (someone else's behind the same NAT or proxy, or an
    attacker's who wants to lock the pool out).  The secrets are 256-bit random values, so
    guessing one is hopeless either way; the limit sheds the load of floods of bad credentials.

    Several coordinators with Redis share their counts: ``on_fail`` hooks publish each failure,
    and failures seen elsewhere come back through :meth:`record`.
    """

    MAX_BUCKETS = 10_000
    #: Bucket names longer than this are not counted (they come from the network with Redis).
    MAX_KEY = 200

    def __init__(self, limit: int, window: float, address_limit: int | None = None) -> None:
        self.limit = limit
        self.window = window
        self.address_limit = address_limit if address_limit is not None else limit * 5
        self._fails: dict[str, deque[float]] = {}
        self._lock = threading.Lock()
        #: Called with the bucket after each failure counted here.
        self.on_fail: list[Callable[[str], None]] = []

    @staticmethod
    def buckets(role: str, addr: str, *extra: str) -> tuple[str, ...]:
        """The buckets one failed attempt of ``role`` from ``addr`` counts in."""
        return (f"{role}|{addr}", f"*|{addr}", *extra)

    def limit_of(self, key: str) -> int:
        return self.address_limit if key.startswith("*|") else self.limit

    def _prune(self, q: deque[float], now: float) -> None:
        while q and q[0] <= now - self.window:
            q.popleft()

    def retry_after(self, key: str) -> int | None:
        """Seconds until ``key``'s bucket takes a failure again; ``None`` when it is not full."""
        now = time.monotonic()
        with self._lock:
            q = self._fails.get(key)
            if q is None:
                return None
            self._prune(q, now)
            if not q:
                del self._fails[key]
                return None
            if len(q) < self.limit_of(key):
                return None
            return max(1, math.ceil(q[0] + self.window - now))

    def check(self, *keys: str) -> None:
        """429 when any of ``keys``' buckets is full (call it for a credential that failed)."""
        for key in keys:
            retry = self.retry_after(key)
            if retry is not None:
                who = key.partition("|")[2]
                raise APIError(
                    429,
                    f"too many failed authentications ({who}); retry in {retry} s",
                    headers={"Retry-After": str(retry)},
                )

    def refuse(self, keys: tuple[str, ...], error: APIError) -> APIError:
        """The answer to a failed authentication: 429 when a bucket is full, else ``error``
        (and the failure is counted)."""
        try:
            self.check(*keys)
        except APIError as limited:
            return limited
        self.fail(*keys)
        return error

    def fail(self, *keys: str) -> None:
        for key in keys:
            self.record(key)
            for hook in self.on_fail:
                hook(key)

    def record(self, key: str) -> None:
        """Count one failure in ``key``'s bucket (here, or on another coordinator)."""
        if len(key) > self.MAX_KEY:
            return
        now = time.monotonic()
        with self._lock:
            if len(self._fails) >= self.MAX_BUCKETS:  # many buckets: forget the stale ones
                for k in list(self._fails):
                    self._prune(self._fails[k], now)
                    if not self._fails[k]:
                        del self._fails[k]
            q = self._fails.setdefault(key, deque())
            q.append(now)
            while len(q) > self.limit_of(key):  # only the newest ``limit`` matter
                q.popleft()


def pool_of(request: Request) -> Pool:
    pool: Pool = request.app.state.pool
    return pool


def client_addr(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()


def role_of(secret: str) -> str:
    """Which role a secret *looks* like, by its shape only (it may not be valid)."""
    if secret.startswith(security.ADMIN_PREFIX):
        return "admin"
    if secret.startswith(security.KEY_PREFIX):
        return "client"
    if secret.startswith(security.TOKEN_PREFIX):
        return "join token"
    if secret.count(".") == 2 and secret.startswith("eyJ"):
        return "worker"
    return "unknown"


def _unauthorized(
    request: Request, role: str, message: str, code: str = "unauthorized"
) -> APIError:
    """401 for a failed ``role`` authentication (or 429 once its buckets are full)."""
    limiter: FailureLimiter = request.app.state.auth_limiter
    error = APIError(401, message, code, headers={"WWW-Authenticate": "Bearer"})
    return limiter.refuse(limiter.buckets(role, client_addr(request)), error)


def valid_role(pool: Pool, secret: str) -> str | None:
    """The role a *valid* secret gives (``admin``, ``worker``, ``client``), else ``None``.

    Only a credential that verifies earns a 403 ("right key, wrong door"); anything else is a
    401 and counts as a failed attempt, so guessing is rate-limited.  Blocking (an API key not
    cached here is looked up in the database): call it off the event loop.
    """
    if pool.credentials.is_admin(secret):
        return "admin"
    if secret.startswith(security.KEY_PREFIX):
        return "client" if pool.credentials.lookup_key(secret) else None
    if secret.count(".") == 2:
        try:
            pool.authenticate_worker(secret)
        except APIError:
            return None
        return "worker"
    return None


def require_admin(request: Request) -> None:
    secret = bearer(request)
    if secret is None:
        raise _unauthorized(
            request, "admin", "admin key required (Authorization: Bearer <admin key>)"
        )
    role = valid_role(pool_of(request), secret)
    if role == "admin":
        return
    if role is not None:
        raise APIError(403, f"a {role} credential cannot use the admin API", "forbidden")
    raise _unauthorized(request, "admin", "invalid admin key")


def require_worker(request: Request) -> tuple[WorkerState, float]:
    secret = bearer(request)
    if secret is None:
        raise _unauthorized(
            request, "worker", "worker credential required (Authorization: Bearer <credential>)"
        )
    pool = pool_of(request)
    if pool.credentials.is_admin(secret) or (
        secret.startswith(security.KEY_PREFIX) and pool.credentials.lookup_key(secret)
    ):
        role = "admin" if pool.credentials.is_admin(secret) else "client"
        raise APIError(403, f"an {role} key cannot act as a worker", "forbidden")
    try:  # a worker that registered on another coordinator is looked up (we are in a thread)
        return pool.authenticate_worker(secret, lookup=True)
    except APIError as exc:
        if exc.status == 401:
            limiter: FailureLimiter = request.app.state.auth_limiter
            keys = limiter.buckets("worker", client_addr(request))
            raise limiter.refuse(keys, exc) from None
        raise


async def require_worker_quick(request: Request) -> tuple[WorkerState, float]:
    """:func:`require_worker` without leaving the event loop when it need not: a valid
    credential of a worker this coordinator knows is checked in memory (a signature and the
    registry); anything else (no or another kind of secret, a bad or expired credential, a
    removed worker, one to look up in the database) takes :func:`require_worker` in a thread,
    with its errors and failure counts."""
    secret = bearer(request)
    if secret is not None and role_of(secret) == "worker":
        pool = pool_of(request)
        try:
            return pool.authenticate_worker(secret)
        except APIError:
            pass
    return await run_in_threadpool(require_worker, request)


AdminDep = Annotated[None, Depends(require_admin)]
WorkerDep = Annotated[tuple[WorkerState, float], Depends(require_worker)]
QuickWorkerDep = Annotated[tuple[WorkerState, float], Depends(require_worker_quick)]
PoolDep = Annotated[Pool, Depends(pool_of)]
