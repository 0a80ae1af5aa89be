"""Which store rag and notes use, and how they reach the data tier's PostgreSQL.

``RMA_SERVICE_STORE``:

- ``local``: SQLite in ``RMA_SERVICE_DATA_DIR`` (the behaviour before the data tier).
- ``postgres``: ``RMA_SERVICE_STORE_URL`` when set, else the pool's data service
  (``RMA_SERVICE_STORE_DATA_SERVICE``, ``postgres``) through the coordinator. While it cannot be
  reached, requests answer 503 ``store_unavailable``; it is tried again at the next request
  (at most every ``RMA_SERVICE_STORE_RETRY`` seconds).
- ``auto`` (default): as ``postgres`` when that PostgreSQL (the URL, else the data service)
  can be reached; else the local store, and PostgreSQL is tried again every
  ``RMA_SERVICE_STORE_RETRY`` seconds. When it is reached later, what the local store holds is
  handed up to it (rows whose ids it lacks), removed from the local store, and the service uses
  PostgreSQL from then on.
  A local store left from before (a file in the folder) is handed up the same way at start.

The data service is reached as ``rma connect`` does: a forwarder on a loopback port of the
service's own (``rma.connect.Forwarder``), each PostgreSQL connection one WebSocket to the
coordinator's ``/api/services/{name}/connect``, with the service's own key (the worker's service
key, read from ``RMA_API_KEY_FILE`` at each connection). Once on PostgreSQL a service stays
there: a lost connection is made again at the next request (to whichever worker holds the data
service then), and until that works requests answer 503, so nothing is written to two places.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Generic, TypeVar

from rma.connect import Forwarder
from rma.services._common import ServiceError, run_sync
from rma.services.settings import ServiceSettings
from rma.services.store import Store, StoreUnavailable

log = logging.getLogger("rma.services.store")

S = TypeVar("S", bound=Store)


class _NotReached(Exception):
    """The data tier could not be used; the message says why."""


class _KeyedForwarder(Forwarder):
    """A forwarder that reads the service's key again for every connection (a re-joined
    worker rewrites its key file)."""

    def __init__(self, url: str, key: Callable[[], str | None], service: str) -> None:
        super().__init__(url, key(), service)
        self._key = key

    def _connect(self, url: str) -> Any:
        key = self._key()
        self._headers = {"Authorization": f"Bearer {key}"} if key else {}
        return super()._connect(url)


class StoreChoice(Generic[S]):
    """The store a service uses now; ``async with choice.use() as store`` in every request."""

    def __init__(
        self,
        settings: ServiceSettings,
        service: str,
        *,
        local: Callable[[], S],
        local_path: Path,
        postgres: Callable[[str, str], S],
        hand_up: Callable[[S, S], int],
    ) -> None:
        self.settings = settings
        self.service = service
        self.schema = f"rma_{service}"
        self._local = local
        self._local_path = local_path
        self._postgres = postgres
        self._hand_up = hand_up
        self.store: S | None = None
        #: why the service does not use PostgreSQL (auto, postgres) right now
        self.reason: str | None = None
        self.handed_up = 0
        #: how the PostgreSQL store in use is reached (for /health)
        self.via: dict[str, Any] = {}
        self._fw: _KeyedForwarder | None = None
        self._lock = asyncio.Lock()
        self._chosen = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._last_try = 0.0
        url = settings.service_store_url
        self._url = url.get_secret_value() if url is not None else None
        #: ``local``, ``postgres`` or ``auto``
        self.mode = settings.service_store

    # --- lifecycle --------------------------------------------------------------------------------

    async def start(self) -> None:
        """Choose in the background (a first try of the data tier may take seconds)."""
        self._spawn(self._choose())

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _choose(self) -> None:
        try:
            async with self._lock:
                if self.mode == "local":
                    self.store = await run_sync(self._local)
                    return
                if self.mode == "auto" and self._local_path.exists():
                    # a folder from before: what it holds is handed up if PostgreSQL answers
                    self.store = await run_sync(self._local)
                await self._try_postgres()
                if self.mode == "auto" and (self.store is None or self.store.kind == "local"):
                    if self.store is None:
                        self.store = await run_sync(self._local)
                    self._spawn(self._retry_loop())
        except Exception as exc:  # reported by /health and as 503, never raised into a request
            self.reason = f"{type(exc).__name__}: {exc}"
            log.warning("%s: no store: %s", self.service, self.reason)
        finally:
            self._chosen.set()

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        async with self._lock:
            if self.store is not None:
                await run_sync(self.store.close)
                self.store = None
            await self._close_forwarder()

    async def _close_forwarder(self) -> None:
        if self._fw is not None:
            await self._fw.aclose()
            self._fw = None

    # --- reaching PostgreSQL ----------------------------------------------------------------------

    def _key(self) -> str | None:
        if self.settings.api_key_file is not None:
            with contextlib.suppress(OSError):
                key = self.settings.api_key_file.read_text().strip()
                if key:
                    return key
        if self.settings.api_key is not None:
            return self.settings.api_key.get_secret_value()
        return None

    async def _try_postgres(self) -> None:
        """Open the PostgreSQL store (the caller holds the lock); sets ``store`` or ``reason``."""
        self._last_try = time.monotonic()
        try:
            if self._url is not None:
                store = await self._open(self._url)
                store_via = {"via": "RMA_SERVICE_STORE_URL"}
            else:
                store, store_via = await self._reach()
        except _NotReached as exc:
            self.reason = str(exc)
            return
        previous = self.store
        if previous is not None:  # auto, until now on the local store: hand its rows up
            try:
                self.handed_up += await run_sync(self._hand_up, previous, store)
            except StoreUnavailable as exc:
                self.reason = f"handing up the local store failed: {exc}"
                await run_sync(store.close)
                await self._close_forwarder()
                return
            await run_sync(previous.close)
        self.store, self.reason, self.via = store, None, store_via
        log.info("%s keeps its store in PostgreSQL (%s)", self.service, store_via)

    async def _open(self, dsn: str) -> S:
        try:
            store: S = await run_sync(self._postgres, dsn, self.schema)
            return store
        except StoreUnavailable as exc:
            raise _NotReached(str(exc)) from None
        except ImportError:
            raise _NotReached(
                "psycopg is not installed: pip install 'rma-pool[postgres]'"
            ) from None

    async def _reach(self) -> tuple[S, dict[str, Any]]:
        """The pool's data service through the coordinator: a forwarder, then the store."""
        from rma.client import RmaError

        name = self.settings.service_store_data_service
        if not self._key():
            raise _NotReached(
                f"no API key to reach the data service {name!r} with (RMA_API_KEY_FILE, "
                "RMA_API_KEY): a data service needs a key, and a pool with anonymous clients "
                "gives its services none"
            )
        try:
            fw = _KeyedForwarder(self.settings.gateway_url, self._key, name)
        except RmaError as exc:  # not an http(s) URL
            raise _NotReached(f"RMA_GATEWAY_URL: {exc.message}") from None
        try:
            try:
                info = await fw.check()
            except RmaError as exc:
                raise _NotReached(f"data service {name!r}: {exc.message} ({exc.code})") from None
            template = info.get("connect_url")
            if not isinstance(template, str) or not template.startswith("postgres"):
                raise _NotReached(f"data service {name!r} has no PostgreSQL connect_url")
            port = await fw.start()
            dsn = template.replace("{host}", "127.0.0.1").replace("{port}", str(port))
            store = await self._open(dsn)
        except BaseException:
            await fw.aclose()
            raise
        await self._close_forwarder()
        self._fw = fw
        return store, {"data_service": name, "worker": info.get("worker")}

    async def _retry_loop(self) -> None:
        """auto on the local store: try the data tier every ``service_store_retry`` seconds."""
        while True:
            await asyncio.sleep(self.settings.service_store_retry)
            async with self._lock:
                if self.store is not None and self.store.kind != "local":
                    return
                await self._try_postgres()
                if self.store is not None and self.store.kind != "local":
                    return

    # --- requests ---------------------------------------------------------------------------------

    @asynccontextmanager
    async def use(self) -> AsyncIterator[S]:
        """The store, for one request's calls; 503 ``store_unavailable`` when there is none."""
        await self._chosen.wait()
        async with self._lock:
            due = time.monotonic() - self._last_try >= self.settings.service_store_retry
            if self.store is None and self.mode == "postgres" and due:
                await self._try_postgres()
            if self.store is None:
                raise ServiceError(
                    503, "store_unavailable", f"the {self.service} store: {self.reason}"
                )
            try:
                yield self.store
            except StoreUnavailable as exc:
                raise ServiceError(503, "store_unavailable", str(exc)) from None

    def describe(self) -> dict[str, Any]:
        """``store`` in ``/health``: the kind in use and where; why not PostgreSQL, if so."""
        info: dict[str, Any] = {"setting": self.settings.service_store}
        if not self._chosen.is_set():  # a first try of PostgreSQL is under way
            return info | {"kind": "choosing"}
        if self.store is not None:
            info |= self.store.describe()
            if self.store.kind != "local":
                info |= self.via
        else:
            info["kind"] = None
        if self.reason is not None:
            info["reason"] = self.reason
        if self.handed_up:
            info["handed_up"] = self.handed_up
        return info
