"""The agent: join the pool, heartbeat, run the assigned services, leave.

``Agent`` is an async context manager; :meth:`Agent.run` joins, then runs its loops (heartbeat,
reconcile and, with the tunnel transport, the tunnel client) in one task group until
:meth:`Agent.request_stop`; then it leaves: tells the coordinator it is draining, lets in-flight
requests finish (bounded), stops its services and ``POST /api/worker/leave``.  A second
:meth:`request_stop` stops at once.  Every loop has jitter and backoff; ``register_once``,
``heartbeat_once`` and ``reconcile_once`` do one step each (tests drive them directly).

Pausing (the donor's side): every ``check_interval`` the agent reads the donor's pause switch
(``pause.json``, :mod:`rma.agent.pause`) and computing preferences (``prefs.json``,
:mod:`rma.agent.prefs`).  When either says "pause", :meth:`Agent.pause` heartbeats
``paused: true`` (the coordinator routes nothing more here), waits (at most ``drain_timeout``) for
the requests in flight to finish, then stops every service (no process left, GPU memory freed)
and keeps heartbeating.  When both allow it again, :meth:`Agent.resume` starts the assigned
services again and heartbeats as soon as they are healthy.  ``check_once`` does one check.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import logging
import os
import re
import socket
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import psutil

from rma import __version__
from rma.agent import backup
from rma.agent.backoff import Backoff, jittered
from rma.agent.gpu import Nvml
from rma.agent.pause import load_pause
from rma.agent.policy import Policy, clip_capabilities, coordinator_problem, policy_from
from rma.agent.prefs import (
    Preferences,
    PrefsChecker,
    PrefsError,
    Sources,
    SystemSources,
    load_prefs,
)
from rma.agent.reconcile import Reconciler, Unit
from rma.agent.runtimes.base import Runtime
from rma.agent.state import (
    AgentLock,
    Identity,
    Served,
    ensure_dir,
    load_identity,
    load_served,
    save_identity,
    save_served,
    save_status,
    write_private,
)
from rma.catalog import Catalog
from rma.client import CoordinatorClient, Coordinators, RmaError, split_urls, tls_verify
from rma.schemas.api import (
    Capabilities,
    HeartbeatRequest,
    HeartbeatResponse,
    Load,
    RegisterRequest,
    RegisterResponse,
    ServiceSpec,
    ServiceStatus,
)
from rma.schemas.enums import ServiceState, Transport
from rma.settings import WorkerSettings

log = logging.getLogger("rma.agent")

#: Least time between two heartbeats, even when service transitions ask for one sooner.
MIN_HEARTBEAT_GAP = 0.25
#: Refused assignments reported per heartbeat (a hostile coordinator may send any number).
MAX_REFUSED_REPORTED = 64
#: The file (in the data dir) that holds the gateway key for this worker's services.
SERVICE_KEY_FILE = "service.key"


class AgentExit(Exception):
    """The agent must stop: ``code`` is the exit status, ``message`` says why."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def retryable(exc: RmaError) -> bool:
    """Transport failures, timeouts, rate limits and server errors are worth retrying."""
    return exc.status is None or exc.status >= 500 or exc.status in (408, 425, 429)


def default_name() -> str:
    """The host name, made a valid worker name."""
    name = re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname().split(".")[0]).strip("-._")
    return (name or "worker")[:63]


def release_memory() -> None:
    """Collect garbage and return free heap pages to the OS (glibc), to keep an idle agent small."""
    gc.collect()
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)


def resolve_transport(value: str) -> Transport:
    """``auto`` is the tunnel: it works from behind NAT without opening a port."""
    return Transport.DIRECT if value == "direct" else Transport.TUNNEL


class Agent:
    def __init__(
        self,
        settings: WorkerSettings,
        *,
        runtime: Runtime,
        catalog: Catalog,
        capabilities: Capabilities,
        transport: Transport | None = None,
        client: CoordinatorClient | None = None,
        nvml: Nvml | None = None,
        policy: Policy | None = None,
        probe_interval: float = 5.0,
        reconcile_interval: float = 5.0,
        retry_cap: float = 60.0,
        sources: Sources | None = None,
    ) -> None:
        self.settings = settings
        self.runtime = runtime
        self.catalog = catalog
        self.capabilities = capabilities
        self.transport = transport or resolve_transport(settings.transport)
        self.data_dir = settings.data_dir
        self.name = settings.name or default_name()
        self.policy = policy or policy_from(settings, catalog)
        #: Assignments this donor's policy refused: name -> why (reported as ``refused``).
        self.refused: dict[str, str] = {}
        self.verify = tls_verify(settings.ca_file, settings.insecure, settings.ca_hash)
        self.client = client or CoordinatorClient(
            Coordinators(settings.coordinator_url), timeout=15.0, verify=self.verify
        )
        self.nvml = nvml
        self.reconcile_interval = reconcile_interval
        self.retry_cap = retry_cap
        self.reconciler = Reconciler(
            runtime,
            self.data_dir,
            advertise_host=settings.advertise_host,
            health_timeout=settings.health_timeout,
            probe_interval=probe_interval,
            on_change=self._on_change,
            fetch_backup=lambda spec, dest, bid: self.client.download_backup(spec.name, dest, bid),
        )
        #: The last backup of each data service sent to the coordinator: time, size or error.
        self.backups: dict[str, dict[str, Any]] = {}
        #: Backups the coordinator asked for (an operator's drain), running now, by service.
        self._fresh_backups: dict[str, asyncio.Task[None]] = {}
        #: One backup at a time (periodic, last, asked for): each writes the same file.
        self._backup_lock = asyncio.Lock()
        self.identity: Identity | None = None
        self.worker_id: str | None = None
        #: The gateway API key for this worker's pool-calling services (None: not needed).
        self.service_key: str | None = None
        self.tier_name: str | None = None
        self.interval = 30.0
        self.coordinator_status: str | None = None
        self.draining = False
        self.forced = False
        self.last_heartbeat: dict[str, Any] | None = None
        #: this worker's credits and escrow, from the last heartbeat answer
        self.credits: dict[str, float] | None = None
        self.started_at = time.time()
        self.tunnel: Any = None
        self._stop = asyncio.Event()
        self._wake_heartbeat = asyncio.Event()
        self._wake_reconcile = asyncio.Event()
        self._stop_requests = 0
        self._main: asyncio.Task[Any] | None = None
        self._lock = AgentLock(self.data_dir)
        self._last_beat = 0.0
        self._running = False
        #: The donor's side: paused (by ``rma worker pause`` or the preferences), and why.
        self.paused = False
        self.pause_reason: str | None = None
        #: ``donor`` (the pause switch) or ``prefs`` (a computing preference does not hold).
        self.pause_source: str | None = None
        self.paused_at: float | None = None
        #: What the coordinator assigned and the policy accepted (kept while paused).
        self.assigned: list[ServiceSpec] = []
        self.prefs = Preferences()
        self._prefs_mtime: float | None = None
        self._prefs_error: str | None = None
        self.checker = PrefsChecker(sources or SystemSources())
        self.served = Served()
        self._served_seen = 0

    # --- context ---------------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        ensure_dir(self.data_dir)
        self._lock.acquire()
        try:
            self.identity = load_identity(self.data_dir)
            self.served = load_served(self.data_dir)
            cleaned = await self.runtime.cleanup()
        except BaseException:
            self._lock.release()
            raise
        for what in cleaned:
            log.warning("removed %s left by an earlier run of this agent", what)
        self._running = True
        self.write_status()
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            await self.reconciler.stop_all(grace=0 if self.forced else None)
        finally:
            self._running = False
            with contextlib.suppress(Exception):
                self.write_status()
            await self.reconciler.aclose()
            await self.client.aclose()
            await self.runtime.aclose()
            if self.nvml is not None:
                self.nvml.close()
            self._lock.release()

    # --- stopping --------------------------------------------------------------------------------

    def request_stop(self) -> None:
        """First call: leave gracefully.  Second call: stop at once."""
        self._stop_requests += 1
        if self._stop_requests == 1:
            log.warning("stopping: draining, then leaving the pool (again to stop at once)")
            self._stop.set()
        else:
            log.warning("stopping at once")
            self.forced = True
            if self._main is not None:
                self._main.cancel()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    # --- one step each ---------------------------------------------------------------------------

    def runnable(self) -> list[str]:
        """The catalog services this machine's runtime can start and this donor allows."""
        names = [n for n, spec in self.catalog.items() if self.runtime.unavailable(spec) is None]
        return self.policy.runnable(names)

    def accept(self, assignments: list[ServiceSpec]) -> list[ServiceSpec]:
        """What of the coordinator's assignments may run here (the donor's policy); the rest is
        refused: logged once, reported as ``refused`` in heartbeats."""
        verdict = self.policy.check(assignments)
        for name, why in verdict.refused.items():
            if self.refused.get(name) != why:
                log.warning("refused the assignment %s: %s", name, why)
        self.refused = verdict.refused
        self.assigned = self.with_pool_env(verdict.accepted)
        return self.assigned

    def service_statuses(self, inflight: Mapping[str, int] | None = None) -> list[ServiceStatus]:
        """What the heartbeat reports: the services that run (with ``inflight``, the requests
        each serves now, as the tunnel counts them), and the refused assignments."""
        out = [s for s in self.reconciler.statuses(inflight) if s.name not in self.refused]
        out += [
            ServiceStatus(name=n, state=ServiceState.REFUSED, healthy=False, message=why[:1000])
            for n, why in sorted(self.refused.items())[:MAX_REFUSED_REPORTED]
        ]
        return out

    def register_request(self) -> RegisterRequest:
        ident = self.identity
        if ident is not None and not set(split_urls(ident.coordinator_url)) & set(
            split_urls(self.settings.coordinator_url)
        ):
            ident = None  # joined another pool before: a new worker here
        return RegisterRequest(
            token=self.settings.token,
            name=self.name,
            capabilities=clip_capabilities(self.capabilities, self.policy.limits),
            labels=self.settings.labels,
            owner=self.settings.owner,
            version=__version__,
            worker_id=ident.worker_id if ident else None,
            worker_secret=ident.worker_secret if ident else None,
            transport=self.transport,
            runnable=self.runnable(),
        )

    async def register_once(self) -> RegisterResponse:
        req = self.register_request()
        if req.worker_id is None and not req.token:
            raise AgentExit(
                1,
                "no join token: pass --token (create one on the coordinator with "
                "`rma admin tokens create`); a worker that joined before re-joins without one",
            )
        resp = await self.client.register(req)
        if resp.worker_secret:
            self.identity = Identity(
                worker_id=resp.worker_id,
                worker_secret=resp.worker_secret,
                coordinator_url=self.settings.coordinator_url,
                name=self.name,
            )
            path = save_identity(self.data_dir, self.identity)
            log.info("saved this worker's identity in %s", path)
        self.worker_id = resp.worker_id
        self.set_service_key(resp.service_key)
        self.tier_name = resp.tier_name
        self.interval = resp.heartbeat_interval
        self.coordinator_status = "online"
        accepted = self.accept(resp.assignments)
        if not self.paused and self.reconciler.set_desired(accepted):
            self._wake_reconcile.set()
        log.info(
            "joined %s as worker %s (tier %s) with %s",
            self.client.base_url,
            resp.worker_id,
            resp.tier_name,
            ", ".join(self.reconciler.desired) or "no services",
        )
        return resp

    @property
    def service_key_file(self) -> Path:
        """Where the services read this worker's gateway key (0600; rewritten at each join)."""
        return self.data_dir / SERVICE_KEY_FILE

    def set_service_key(self, key: str | None) -> None:
        """Keep the key the coordinator gave at (re-)join, in memory and in its file.

        The services read the file at each gateway call, so a new key (a re-join) reaches
        them without a restart: their environment, and so their specs, stay the same.
        """
        self.service_key = key
        if key:
            ensure_dir(self.data_dir)
            write_private(self.service_key_file, key + "\n")
        else:
            with contextlib.suppress(FileNotFoundError):
                self.service_key_file.unlink()

    def with_pool_env(self, specs: list[ServiceSpec]) -> list[ServiceSpec]:
        """Services that call the pool (rag, notes, doc) reach it through its gateway, with
        this worker's own service key (its file) when the pool requires API keys."""
        pool_env = {"RMA_GATEWAY_URL": self.client.base_url}
        if self.service_key:
            pool_env["RMA_API_KEY_FILE"] = str(self.service_key_file)
        return [s.model_copy(update={"env": {**pool_env, **s.env}}) for s in specs]

    def load(self) -> Load:
        vm = psutil.virtual_memory()
        gpu, gpu_mem = (None, None)
        if self.nvml is not None and self.capabilities.gpus:
            gpu, gpu_mem = self.nvml.load()
        return Load(
            cpu_percent=psutil.cpu_percent(None),
            memory_percent=vm.percent,
            gpu_percent=gpu,
            gpu_memory_percent=gpu_mem,
        )

    async def heartbeat_once(self) -> HeartbeatResponse:
        counts = getattr(self.tunnel, "inflight_by_service", None)
        statuses = self.service_statuses(counts() if callable(counts) else None)
        req = HeartbeatRequest(
            load=self.load(),
            services=statuses,
            draining=self.draining,
            paused=self.paused,
            pause_reason=(self.pause_reason or "")[:200] or None,
        )
        self._last_beat = time.monotonic()
        try:
            resp = await self.client.heartbeat(req)
        except RmaError as exc:
            self.last_heartbeat = {"at": time.time(), "ok": False, "error": exc.message}
            self.write_status()
            raise
        self.reconciler.forget_stopped(s.name for s in statuses if s.state is ServiceState.STOPPED)
        self.interval = resp.heartbeat_interval
        self.coordinator_status = resp.status.value
        self.last_heartbeat = {"at": time.time(), "ok": True, "status": resp.status.value}
        if resp.credits is not None:  # the donor's own, from the coordinator's ledger
            self.credits = {"credits": resp.credits, "escrow": resp.escrow or 0.0}
        accepted = self.accept(resp.assignments)
        if not self.stopping and not self.paused and self.reconciler.set_desired(accepted):
            self._wake_reconcile.set()
        for service, backup_id in resp.restore.items():  # rma admin restore
            log.warning("the operator asked to restore %s from backup %s", service, backup_id)
            self.reconciler.request_restore(service, backup_id)
            self._wake_reconcile.set()
        for service in resp.backup:  # an operator's drain: the backup the next holder restores
            self._backup_soon(service)
        self.write_status()
        return resp

    async def reconcile_once(self) -> None:
        await self.reconciler.run_once()

    # --- the donor's side: pause and resume --------------------------------------------------

    def read_prefs(self) -> Preferences:
        """The computing preferences, re-read when ``prefs.json`` changed (a bad file: the last
        good ones stay, and the problem is logged once)."""
        path = self.data_dir / "prefs.json"
        try:
            mtime: float | None = path.stat().st_mtime
        except OSError:
            mtime = None
        if mtime != self._prefs_mtime:
            self._prefs_mtime = mtime
            try:
                before = self.prefs.limits()
                self.prefs = load_prefs(self.data_dir)
                self._prefs_error = None
                if self._running and self.prefs.limits() != before and self.worker_id:
                    log.warning("the new limits in %s take effect at the agent's next start", path)
                log.info("computing preferences: %s", self.prefs.model_dump(exclude_defaults=True))
            except PrefsError as exc:
                if self._prefs_error != str(exc):
                    log.warning("%s; keeping the preferences in force", exc)
                self._prefs_error = str(exc)
        return self.prefs

    def pause_wanted(self) -> tuple[str, str] | None:
        """``(source, reason)`` when the donor's switch or preferences say pause, else ``None``."""
        switch = load_pause(self.data_dir)
        if switch is not None:
            return "donor", switch.describe()
        reason = self.checker.check(self.read_prefs())
        return ("prefs", reason) if reason else None

    async def check_once(self) -> None:
        """One check of the pause switch and the preferences: pause or resume if they changed."""
        wanted = await asyncio.to_thread(self.pause_wanted)
        if self.stopping:
            return
        if wanted is not None:
            source, reason = wanted
            if not self.paused:
                await self.pause(reason, source)
            elif (source, reason) != (self.pause_source, self.pause_reason):
                if source != self.pause_source:
                    self._wake_heartbeat.set()  # the next regular heartbeat carries the rest
                self.pause_source, self.pause_reason = source, reason
                self.write_status()
        elif self.paused:
            await self.resume()

    async def pause(self, reason: str, source: str = "donor") -> None:
        """Drain (bounded), stop every service, keep heartbeating as ``paused``."""
        log.warning("pausing: %s", reason)
        self.paused, self.pause_reason, self.pause_source = True, reason, source
        self.paused_at = time.time()
        await self._last_backup()  # before the coordinator hears: the next holder restores it
        with contextlib.suppress(RmaError, TimeoutError):
            await asyncio.wait_for(self.heartbeat_once(), 10)  # no new requests from now on
        await self._wait_idle(self.settings.drain_timeout)
        await self.reconciler.stop_all()
        release_memory()
        log.warning("paused: no service runs here until resumed")
        self._wake_heartbeat.set()
        self.write_status()

    async def resume(self) -> None:
        """Start the assigned services again; heartbeat as soon as they are healthy."""
        log.warning("resuming: starting %s", ", ".join(s.name for s in self.assigned) or "nothing")
        self.paused, self.pause_reason, self.pause_source = False, None, None
        self.paused_at = None
        self.reconciler.set_desired(self.assigned)
        await self.reconcile_once()
        self._wake_heartbeat.set()
        self.write_status()

    def local_inflight(self) -> int:
        """Requests in flight here: the tunnel's, plus open connections to the services' ports
        (the direct transport; a kept-alive idle connection counts until its server closes it)."""
        ports = {u.port for u in self.reconciler.units.values() if u.port}
        count = self.inflight()
        if not ports:
            return count
        try:
            conns = psutil.net_connections("tcp")
        except (psutil.Error, OSError):
            return count
        return count + sum(
            1
            for c in conns
            if c.status == psutil.CONN_ESTABLISHED and c.laddr and c.laddr.port in ports
        )

    async def _wait_idle(self, bound: float) -> None:
        deadline = time.monotonic() + bound
        while time.monotonic() < deadline:
            if await asyncio.to_thread(self.local_inflight) == 0:
                return
            await asyncio.sleep(0.2)
        log.warning("requests still in flight after %.0fs: stopping anyway", bound)

    # --- the loops -------------------------------------------------------------------------------

    async def join(self) -> RegisterResponse | None:
        """Register, retrying while the coordinator is unreachable; ``None`` if stopped first."""
        problem = coordinator_problem(
            self.settings.coordinator_url, self.settings.insecure, bool(self.settings.ca_hash)
        )
        if problem is not None:
            raise AgentExit(1, problem)
        backoff = Backoff(1.0, self.retry_cap)
        while not self.stopping:
            try:
                return await self.register_once()
            except RmaError as exc:
                if exc.code == "coordinator_mismatch":
                    raise AgentExit(1, exc.message) from None
                if not retryable(exc):
                    raise AgentExit(1, self._refusal(exc)) from None
                delay = backoff.next()
                log.warning("cannot register: %s; retrying in %.0fs", exc.message, delay)
                await self._sleep(delay)
        return None

    def _refusal(self, exc: RmaError) -> str:
        path = self.data_dir / "worker.json"
        if exc.code == "invalid_worker_secret":
            return f"{exc.message} (the identity in {path} is not valid here; delete it)"
        if exc.code == "removed":
            return f"{exc.message} (pass a new --token to join again)"
        if exc.code == "invalid_token":
            return f"the coordinator refused the join token: {exc.message}"
        return f"the coordinator refused this worker: {exc.message}"

    async def run(self) -> int:
        """Join, run until stopped, leave.  Returns the exit status; raises :class:`AgentExit`."""
        self._main = asyncio.current_task()
        wanted = await asyncio.to_thread(self.pause_wanted)
        if wanted is not None:  # paused before it started: join, but start nothing
            self.paused, self.pause_source, self.pause_reason = True, wanted[0], wanted[1]
            self.paused_at = time.time()
            log.warning("starting paused: %s", wanted[1])
        if await self.join() is None:
            return 0
        await self.reconcile_once()
        release_memory()  # start-up (imports, detection) is over: hand its heap back
        try:
            async with asyncio.TaskGroup() as tg:
                loops = [
                    tg.create_task(self._heartbeat_loop(), name="rma:heartbeat"),
                    tg.create_task(self._reconcile_loop(), name="rma:reconcile"),
                    tg.create_task(self._check_loop(), name="rma:donor"),
                ]
                if self.settings.backup_interval > 0:
                    loops.append(tg.create_task(self._backup_loop(), name="rma:backup"))
                tunnel = self._make_tunnel()
                carrier = None
                if tunnel is not None:
                    carrier = tg.create_task(self._keep(tunnel.run, "tunnel"), name="rma:tunnel")
                await self._stop.wait()
                for task in loops:
                    task.cancel()
                # the tunnel stays up while the requests it carries finish
                await self.drain()
                if carrier is not None:
                    carrier.cancel()
        except* AgentExit as group:
            raise group.exceptions[0] from None
        finally:
            for task in self._fresh_backups.values():
                task.cancel()
        await self.leave()
        return 0

    async def _heartbeat_loop(self) -> None:
        backoff = Backoff(1.0, self.retry_cap)
        failing = False
        while True:
            wait = jittered(self.interval)
            try:
                await self.heartbeat_once()
                if failing:
                    log.warning("the coordinator answers again")
                failing = False
                backoff.reset()
            except RmaError as exc:
                if exc.status == 401 and exc.code == "removed":
                    raise AgentExit(
                        1,
                        "this worker was removed by the operator (rma admin remove); its "
                        "services are stopped (pass a new --token to join again)",
                    ) from None
                if exc.status == 401 and exc.code == "evicted":
                    log.warning(
                        "the coordinator removed this worker after a long silence (asleep or "
                        "offline?), not the operator: re-joining with its saved identity"
                    )
                    if await self.join() is None:
                        return
                    await self.reconcile_once()
                    continue
                if exc.status in (401, 409):
                    log.warning(
                        "the coordinator does not know this worker (%s): registering again",
                        exc.message,
                    )
                    if await self.join() is None:
                        return
                    await self.reconcile_once()
                    continue
                wait = backoff.next()
                if not failing or log.isEnabledFor(logging.DEBUG):
                    log.warning(
                        "heartbeat failed: %s; services keep running; retrying in %.0fs",
                        exc.message,
                        wait,
                    )
                failing = True
            await self._wait(self._wake_heartbeat, wait)
            gap = MIN_HEARTBEAT_GAP - (time.monotonic() - self._last_beat)
            if gap > 0:
                await asyncio.sleep(gap)

    async def _reconcile_loop(self) -> None:
        while True:
            await self._wait(self._wake_reconcile, jittered(self.reconcile_interval))
            try:
                await self.reconcile_once()
            except Exception:
                log.exception("reconcile failed; trying again")

    async def _check_loop(self) -> None:
        while not self.stopping:
            await asyncio.sleep(self.settings.check_interval)
            try:
                await self.check_once()
            except Exception:
                log.exception("the pause check failed; trying again")

    async def _backup_loop(self) -> None:
        """Every ``backup_interval``: back up each healthy data service to the coordinator."""
        while not self.stopping:
            await asyncio.sleep(jittered(self.settings.backup_interval, 0.1))
            await self.backup_once()

    async def _last_backup(self) -> None:
        """Before this worker lets its data services go (drain, leave, pause): one more backup,
        the one their next holder restores (bounded by ``drain_timeout``)."""
        if self.settings.backup_interval > 0:  # (only healthy services are backed up)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.backup_once(), self.settings.drain_timeout)

    def _backup_soon(self, service: str) -> None:
        """Back ``service`` up now, beside the loops (once: asked again while it runs, no-op)."""
        running = self._fresh_backups.get(service)
        if running is not None and not running.done():
            return
        log.warning("the coordinator asks for a fresh backup of %s (a drain)", service)
        self._fresh_backups[service] = asyncio.create_task(
            self.backup_once({service}), name=f"rma:backup:{service}"
        )

    async def backup_once(self, only: set[str] | None = None) -> None:
        """One backup of each healthy data service with a catalog ``backup`` (``only``: of
        these), uploaded."""
        async with self._backup_lock:
            await self._backup_units(only)

    async def _backup_units(self, only: set[str] | None) -> None:
        for unit in list(self.reconciler.units.values()):
            method = backup.method_of(unit.spec)
            if method is None or not unit.healthy or unit.port is None:
                continue
            if only is not None and unit.name not in only:
                continue
            folder = self.data_dir / "backups"
            dest = folder / f"{unit.name}{method.suffix}"
            try:
                await asyncio.to_thread(folder.mkdir, parents=True, exist_ok=True)
                inside = self.reconciler.inside(unit)  # the docker runtime: in its container
                await backup.take(
                    unit.spec, unit.port, self.reconciler.service_dir(unit.name), dest, inside
                )
                info = await self.client.upload_backup(unit.name, dest)
                self.backups[unit.name] = {"at": time.time(), "size": info.get("size")}
            except (backup.BackupError, RmaError, OSError) as exc:
                message = exc.message if isinstance(exc, RmaError) else str(exc)
                self.backups[unit.name] = {"at": time.time(), "error": message}
                log.warning("backup of %s failed: %s", unit.name, message)
            finally:
                await asyncio.to_thread(dest.unlink, missing_ok=True)

    async def _keep(self, fn: Callable[[], Awaitable[None]], what: str) -> None:
        """Run ``fn`` forever: restart it with backoff when it ends or fails."""
        backoff = Backoff(1.0, 60.0)
        while True:
            started = time.monotonic()
            try:
                await fn()
                reason = "ended"
            except Exception as exc:
                reason = f"failed: {type(exc).__name__}: {exc}"
            if time.monotonic() - started > 60:
                backoff.reset()
            delay = backoff.next()
            log.warning("%s %s; restarting in %.0fs", what, reason, delay)
            await asyncio.sleep(delay)

    def _make_tunnel(self) -> Any:
        if self.transport is not Transport.TUNNEL:
            return None
        try:
            from rma.agent.tunnel import TunnelClient  # type: ignore[import-not-found, unused-ignore]
        except ImportError:
            log.debug("no tunnel client in this build")
            return None
        self.tunnel = TunnelClient(
            getattr(self.client, "urls", self.settings.coordinator_url),
            credential=lambda: self.client.credential or "",
            endpoints=self.reconciler.local_endpoint,
            verify=self.verify,
            on_failover=self._failed_over,
            tcp_endpoints=self.reconciler.local_tcp_endpoint,
        )
        return self.tunnel

    def _failed_over(self, url: str) -> None:
        """The tunnel moved to another coordinator: heartbeat there now, not in 30 s."""
        log.warning("failing over to the coordinator at %s", url)
        self._wake_heartbeat.set()

    def inflight(self) -> int:
        """Requests the tunnel is carrying to this agent's services right now (0 without one)."""
        value = getattr(self.tunnel, "inflight", 0)
        if callable(value):
            value = value()
        if isinstance(value, dict):
            return sum(int(v) for v in value.values())
        return int(value) if isinstance(value, int | float) else 0

    async def drain(self) -> None:
        """Tell the coordinator this worker is draining; wait (bounded by ``drain_timeout``) until
        it has handed this worker's services over, then for the requests in flight."""
        if self.draining:
            return
        self.draining = True
        await self._last_backup()
        held = True
        with contextlib.suppress(RmaError, TimeoutError):
            held = bool((await asyncio.wait_for(self.heartbeat_once(), 10)).assignments)
        deadline = time.monotonic() + self.settings.drain_timeout
        # The coordinator places this worker's services elsewhere and lets go of each once its
        # replacement is healthy: wait (bounded) for that, then for the requests in flight.
        while held and time.monotonic() < deadline:
            await asyncio.sleep(1.0)
            try:
                held = bool((await asyncio.wait_for(self.heartbeat_once(), 10)).assignments)
            except (RmaError, TimeoutError):
                break
        while self.inflight() > 0 and time.monotonic() < deadline:  # noqa: ASYNC110 - a count
            await asyncio.sleep(0.1)
        if self.inflight() > 0:
            log.warning(
                "%d request(s) still in flight after %.0fs",
                self.inflight(),
                self.settings.drain_timeout,
            )

    async def leave(self) -> None:
        """Drain (unless done), stop the services, tell the coordinator this worker left."""
        await self.drain()
        await self.reconciler.stop_all()
        with contextlib.suppress(RmaError, TimeoutError):
            await asyncio.wait_for(self.heartbeat_once(), 10)
        try:
            await asyncio.wait_for(self.client.leave(), 10)
            log.warning("left the pool")
        except (RmaError, TimeoutError) as exc:
            reason = exc.message if isinstance(exc, RmaError) else "timed out"
            log.warning("services stopped, but the coordinator was not told: %s", reason)

    # --- helpers ---------------------------------------------------------------------------------

    def _on_change(self, unit: Unit) -> None:
        self._wake_heartbeat.set()

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)

    @staticmethod
    async def _wait(event: asyncio.Event, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), seconds)
        event.clear()

    def status(self) -> dict[str, Any]:
        """What ``rma worker status`` shows."""
        units = self.reconciler.units
        return {
            "pid": os.getpid(),
            "running": self._running,
            "coordinator": self.settings.coordinator_url,
            "worker_id": self.worker_id or (self.identity.worker_id if self.identity else None),
            "name": self.name,
            "tier": self.tier_name,
            "runtime": self.runtime.describe(),
            "transport": self.transport.value,
            "status": self.coordinator_status,
            "draining": self.draining,
            "state": self.donor_state(),
            "paused": self.paused,
            "pause_reason": self.pause_reason,
            "pause_source": self.pause_source,
            "paused_at": self.paused_at,
            "preferences": self.prefs.model_dump(exclude_defaults=True),
            "started_at": self.started_at,
            "uptime_s": round(time.time() - self.started_at, 1),
            "served": {
                "today": self.served.today,
                "total": self.served.total,
                "counted": self.transport is Transport.TUNNEL,
            },
            "updated_at": time.time(),
            "heartbeat_interval": self.interval,
            "last_heartbeat": self.last_heartbeat,
            "owner": self.settings.owner or self.settings.labels.get("owner", ""),
            "credits": self.credits,
            "tunnel": self._tunnel_status(),
            "pinned": self.settings.ca_hash,
            **self.policy.to_json(),
            "services": [
                {
                    **s.model_dump(mode="json"),
                    "port": units[s.name].port if s.name in units else None,
                    "restarts": units[s.name].restarts if s.name in units else 0,
                    "restored": units[s.name].restored if s.name in units else False,
                    "backup": self.backups.get(s.name),
                }
                for s in self.service_statuses()
            ],
        }

    def donor_state(self) -> str:
        """``serving``, ``paused`` (by the donor), ``waiting`` (preferences), ``stopped``."""
        if not self._running:
            return "stopped"
        if self.paused:
            return "paused" if self.pause_source == "donor" else "waiting"
        return "serving"

    def _tunnel_status(self) -> dict[str, Any] | None:
        t = self.tunnel
        if t is None:
            return None
        return {
            "connected": bool(getattr(t, "connected", False)),
            "connects": getattr(t, "connects", None),
            "last_error": getattr(t, "last_error", None),
            "inflight": self.inflight(),
        }

    def count_served(self) -> None:
        """Add the requests the tunnel carried since the last count to ``served.json``."""
        now = int(getattr(self.tunnel, "served", 0) or 0)
        new, self._served_seen = now - self._served_seen, now
        day = time.strftime("%Y-%m-%d")
        if new > 0 or day != self.served.day:
            self.served.add(max(new, 0), day)
            with contextlib.suppress(OSError):
                save_served(self.data_dir, self.served)

    def write_status(self) -> None:
        self.count_served()
        try:
            save_status(self.data_dir, self.status())
        except OSError as exc:
            log.debug("cannot write the status file: %s", exc)
