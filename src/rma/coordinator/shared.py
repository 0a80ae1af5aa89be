"""Several coordinators over one database: what they share through Redis (``--redis-url``).

- Per-key requests-per-minute limits: one token bucket per key in Redis, taken by a small Lua
  script (atomic, one round trip, Redis's clock), the same shape as the local bucket.
- Key revocations: published on the ``rma:events`` channel; every coordinator drops the key at
  once.
- Failed authentications: published on the same channel (the bucket each counts in: role and
  address, address, join token); every coordinator counts them.
- Workers' cool-downs, given and lifted (:mod:`rma.coordinator.cluster.cooldowns`), on the same
  channel: a broken worker is avoided by every coordinator.

When Redis is away, each coordinator keeps serving: rate limits fall back to its local bucket
(fail open, logged once), authentication keeps working from its key cache and the database (it
never fails open), a revocation still reaches it through the periodic reload from the database
(``key_refresh_interval``), and ``/readyz`` says so in its body without failing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from rma.coordinator.auth import FailureLimiter
from rma.coordinator.credentials import Credentials
from rma.coordinator.gateway.ratelimit import RateLimiter, rate_limited, retry_after
from rma.coordinator.metrics import Labels
from rma.settings import CoordinatorSettings

log = logging.getLogger("rma.coordinator.shared")

CHANNEL = "rma:events"
BUCKET_PREFIX = "rma:rpm:"
#: Longest wait between two tries to reach Redis again.
MAX_BACKOFF = 5.0
#: Messages waiting to be published; past it they are dropped (Redis is slow or away).
QUEUE_SIZE = 1000
#: Longest failed-authentication bucket (role and address, or a token id) taken from a message.
MAX_BUCKET = FailureLimiter.MAX_KEY

#: KEYS[1]: the key's bucket; ARGV[1]: rpm.  Returns {allowed (0/1), tokens left (a string)}.
RPM_SCRIPT = """
local rpm = tonumber(ARGV[1])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local b = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(b[1])
local ts = tonumber(b[2])
if tokens == nil or ts == nil then
  tokens = rpm
  ts = now
end
tokens = math.min(rpm, tokens + math.max(0, now - ts) * rpm / 60)
local allowed = 0
if tokens >= 1 then
  tokens = tokens - 1
  allowed = 1
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(now))
redis.call('EXPIRE', KEYS[1], 61)
return {allowed, tostring(tokens)}
"""

_ERRORS = (RedisError, OSError, asyncio.TimeoutError)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


class RedisLink:
    """The Redis client, and what this coordinator knows of Redis's health.

    After a failure, Redis is left alone for a back-off (doubling up to ``MAX_BACKOFF``) so that
    requests do not each wait for a timeout; the pub/sub listener's reconnects mark it up again.
    """

    def __init__(self, url: str, timeout: float) -> None:
        self.client: Redis = Redis.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 1),  # once: a pooled connection may be stale
            health_check_interval=5,
            decode_responses=True,
        )
        self.up: bool | None = None  # None: not tried yet
        self.error = "not connected yet"
        self.closing = False
        self._backoff = 0.0
        self._retry_at = 0.0

    def usable(self) -> bool:
        return self.up is not False or time.monotonic() >= self._retry_at

    def ok(self) -> None:
        if self.up is False:
            log.warning("Redis is reachable again: limits and revocations are shared again")
        self.up = True
        self.error = ""
        self._backoff = 0.0

    def failed(self, exc: BaseException) -> None:
        if self.closing:
            return
        self.error = _one_line(exc)
        if self.up is not False:
            log.warning(
                "Redis is unreachable (%s): serving on with this coordinator's own rate limits",
                self.error,
            )
        self.up = False
        self._backoff = min(MAX_BACKOFF, max(0.25, self._backoff * 2))
        self._retry_at = time.monotonic() + self._backoff

    def status(self) -> str:
        return "ok" if self.up else f"unreachable: {self.error}"

    async def ping(self) -> str:
        """Ask Redis now; the status as ``/readyz`` shows it."""
        try:
            await self.client.ping()
        except _ERRORS as exc:
            self.failed(exc)
        else:
            self.ok()
        return self.status()

    async def aclose(self) -> None:
        self.closing = True
        await self.client.aclose()


class SharedRateLimiter(RateLimiter):
    """The per-key token bucket in Redis; this coordinator's own bucket while Redis is away."""

    def __init__(self, link: RedisLink) -> None:
        super().__init__()
        self.link = link
        self._script = link.client.register_script(RPM_SCRIPT)

    async def acquire(self, key_id: str, rpm: int) -> None:
        if rpm <= 0:
            return
        if self.link.usable():
            try:
                allowed, tokens = await self._script(keys=[BUCKET_PREFIX + key_id], args=[rpm])
            except _ERRORS as exc:
                self.link.failed(exc)
            else:
                self.link.ok()
                if int(allowed):
                    return
                raise rate_limited(rpm, retry_after(float(tokens), rpm))
        self.check(key_id, rpm)  # fail open: the local limit still holds


class SharedEvents:
    """Revocations and failed authentications, published to and heard from the other
    coordinators on one pub/sub channel."""

    def __init__(self, link: RedisLink, credentials: Credentials, failures: FailureLimiter) -> None:
        self.link = link
        self.credentials = credentials
        self.failures = failures
        self.node = secrets.token_hex(8)  # our own messages come back too: skip them
        self.received = 0
        #: Other message types -> who applies them (on the loop; the cool-downs' ``cooled``).
        self.handlers: dict[str, Callable[[dict[str, Any]], None]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue[str] | None = None
        self._listener: asyncio.Task[None] | None = None

    # --- out --------------------------------------------------------------------------------------

    def key_revoked(self, key_id: str) -> None:
        self._send({"type": "key_revoked", "id": key_id})

    def auth_failed(self, bucket: str) -> None:
        self._send({"type": "auth_fail", "bucket": bucket})

    def send(self, message: dict[str, Any]) -> None:
        """Queue any message for the others (its ``type`` names who applies it there)."""
        self._send(message)

    def _send(self, message: dict[str, Any]) -> None:
        """Queue a message for :meth:`publish_loop` (thread-safe: routes run in threads too)."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        data = json.dumps({**message, "from": self.node})
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            loop.call_soon_threadsafe(self._put, data)

    def _put(self, data: str) -> None:
        if self._queue is not None and not self._queue.full():
            self._queue.put_nowait(data)

    async def publish_loop(self) -> None:
        """Publish queued messages, a pipeline at a time (an ``app.state.background`` task)."""
        self._queue = asyncio.Queue(QUEUE_SIZE)
        self._loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            while not self._queue.empty():
                batch.append(self._queue.get_nowait())
            if not self.link.usable():
                continue  # dropped: the others catch revocations from the database
            try:
                async with self.link.client.pipeline(transaction=False) as pipe:
                    for data in batch:
                        pipe.publish(CHANNEL, data)
                    await pipe.execute()
            except _ERRORS as exc:
                self.link.failed(exc)
            else:
                self.link.ok()

    # --- in ---------------------------------------------------------------------------------------

    async def listen(self) -> None:
        """Hear the other coordinators; reconnect with back-off (an app background task).

        After a gap, reload the keys from the database: revocations may have been missed.
        """
        import anyio

        self._listener = asyncio.current_task()
        backoff = 0.0
        missed = False
        while not self.link.closing:
            pubsub = self.link.client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(CHANNEL)
                self.link.ok()
                backoff = 0.0
                if missed:
                    await anyio.to_thread.run_sync(self.credentials.refresh)
                    missed = False
                while not self.link.closing:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.5)
                    if message is not None:
                        self.handle(message.get("data"))
            except _ERRORS as exc:
                self.link.failed(exc)
                missed = True
            except Exception as exc:  # the database, during the reload: try again later
                log.warning("cannot reload API keys after a Redis gap: %s", _one_line(exc))
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
            if not self.link.closing:
                backoff = min(MAX_BACKOFF, max(0.2, backoff * 2))
                await asyncio.sleep(backoff)

    async def aclose(self) -> None:
        """Stop listening, then close the client (app shutdown).

        The listener is let to finish its read rather than cancelled or cut off mid-read: under
        uvloop either can leave redis-py's pub/sub read waiting for ever.
        """
        self.link.closing = True
        task = self._listener
        if task is not None and not task.done():
            await asyncio.wait({task}, timeout=2.0)
            task.cancel()
        await self.link.aclose()

    def handle(self, data: Any) -> None:
        """One message from the channel; anything malformed is ignored."""
        try:
            message = json.loads(data)
        except (TypeError, ValueError):
            return
        if not isinstance(message, dict) or message.get("from") == self.node:
            return
        kind = message.get("type")
        if kind == "key_revoked" and isinstance(message.get("id"), str):
            self.received += 1
            self.credentials.forget_key(message["id"])
        elif (
            kind == "auth_fail"
            and isinstance(message.get("bucket"), str)
            and len(message["bucket"]) <= MAX_BUCKET
        ):
            self.received += 1
            self.failures.record(message["bucket"])
        elif isinstance(kind, str) and kind in self.handlers:
            self.received += 1
            self.handlers[kind](message)


class Shared:
    """Everything one coordinator shares through Redis, wired into its app by :func:`attach`."""

    def __init__(self, settings: CoordinatorSettings, app: FastAPI) -> None:
        assert settings.redis_url
        self.link = RedisLink(settings.redis_url, settings.redis_timeout)
        self.limiter = SharedRateLimiter(self.link)
        self.events = SharedEvents(self.link, app.state.pool.credentials, app.state.auth_limiter)

    async def readiness(self) -> dict[str, str]:
        return {"redis": await self.link.ping()}


def attach(app: FastAPI, settings: CoordinatorSettings) -> Shared:
    """Share limits, failed authentications and revocations with the other coordinators."""
    shared = Shared(settings, app)
    state = app.state
    state.shared = shared
    state.pool.credentials.on_revoke.append(shared.events.key_revoked)
    state.auth_limiter.on_fail.append(shared.events.auth_failed)
    background: list[Callable[[], Awaitable[None]]] = state.background
    background += [shared.events.listen, shared.events.publish_loop]
    state.on_shutdown.append(shared.events.aclose)
    state.readiness.append(shared.readiness)

    def up() -> list[tuple[Labels, float]]:
        return [((), 1.0 if shared.link.up else 0.0)]

    state.metrics.gauge("rma_redis_up", "1 while this coordinator reaches Redis, else 0.", up)
    return shared
