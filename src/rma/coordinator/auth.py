"""Who is calling: admin, worker or client; failed attempts rate-limited per address."""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Annotated

from fastapi import Depends, Request

from rma.coordinator import security
from rma.coordinator.errors import APIError
from rma.coordinator.pool import Pool
from rma.coordinator.registry import WorkerState


class FailureLimiter:
    """At most ``limit`` failed authentications per address per ``window`` seconds.

    Past that, every request from the address that needs authentication gets 429 with
    ``Retry-After`` until the oldest failure leaves the window (a correct key too: guessing
    must not be able to tell).

    Several coordinators with Redis share their counts: ``on_fail`` hooks publish each failure,
    and failures seen elsewhere come back through :meth:`record`.
    """

    MAX_ADDRESSES = 10_000

    def __init__(self, limit: int, window: float) -> None:
        self.limit = limit
        self.window = window
        self._fails: dict[str, deque[float]] = {}
        self._lock = threading.Lock()
        #: Called with the address after each failure counted here.
        self.on_fail: list[Callable[[str], None]] = []

    def _prune(self, q: deque[float], now: float) -> None:
        while q and q[0] <= now - self.window:
            q.popleft()

    def check(self, addr: str) -> None:
        now = time.monotonic()
        with self._lock:
            q = self._fails.get(addr)
            if q is None:
                return
            self._prune(q, now)
            if len(q) >= self.limit:
                retry = max(1, math.ceil(q[0] + self.window - now))
                raise APIError(
                    429,
                    f"too many failed authentications from {addr}; retry in {retry} s",
                    headers={"Retry-After": str(retry)},
                )
            if not q:
                del self._fails[addr]

    def fail(self, addr: str) -> None:
        self.record(addr)
        for hook in self.on_fail:
            hook(addr)

    def record(self, addr: str) -> None:
        """Count one failure from ``addr`` (here, or on another coordinator)."""
        now = time.monotonic()
        with self._lock:
            if len(self._fails) >= self.MAX_ADDRESSES:  # many addresses: forget the stale ones
                for key in list(self._fails):
                    self._prune(self._fails[key], now)
                    if not self._fails[key]:
                        del self._fails[key]
            q = self._fails.setdefault(addr, deque())
            q.append(now)
            while len(q) > self.limit:  # only the newest ``limit`` matter
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


def _unauthorized(request: Request, message: str, code: str = "unauthorized") -> APIError:
    request.app.state.auth_limiter.fail(client_addr(request))
    return APIError(401, message, code, headers={"WWW-Authenticate": "Bearer"})


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
    limiter = request.app.state.auth_limiter
    limiter.check(client_addr(request))
    secret = bearer(request)
    if secret is None:
        raise _unauthorized(request, "admin key required (Authorization: Bearer <admin key>)")
    role = valid_role(pool_of(request), secret)
    if role == "admin":
        return
    if role is not None:
        raise APIError(403, f"a {role} credential cannot use the admin API", "forbidden")
    raise _unauthorized(request, "invalid admin key")


def require_worker(request: Request) -> tuple[WorkerState, float]:
    request.app.state.auth_limiter.check(client_addr(request))
    secret = bearer(request)
    if secret is None:
        raise _unauthorized(
            request, "worker credential required (Authorization: Bearer <credential>)"
        )
    pool = pool_of(request)
    if pool.credentials.is_admin(secret) or (
        secret.startswith(security.KEY_PREFIX) and pool.credentials.lookup_key(secret)
    ):
        role = "admin" if pool.credentials.is_admin(secret) else "client"
        raise APIError(403, f"an {role} key cannot act as a worker", "forbidden")
    try:
        return pool.authenticate_worker(secret)
    except APIError as exc:
        if exc.status == 401:
            request.app.state.auth_limiter.fail(client_addr(request))
        raise


AdminDep = Annotated[None, Depends(require_admin)]
WorkerDep = Annotated[tuple[WorkerState, float], Depends(require_worker)]
PoolDep = Annotated[Pool, Depends(pool_of)]
