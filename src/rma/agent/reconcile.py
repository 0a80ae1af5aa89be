"""Desired assignments vs what runs.

:meth:`Reconciler.run_once` compares the coordinator's assignments with the services this agent
runs: it starts a supervisor for each new one, and stops what is no longer assigned (or whose spec
changed).  A supervisor drives one service through :class:`~rma.schemas.enums.ServiceState`:
pull, start, probe until healthy (``running``), keep probing (``unhealthy`` when it stops
answering), restart with backoff when it dies (``crashed``), give up only on a
:class:`RuntimeFailure` (``failed``, terminal until the assignment changes).  Every transition
is passed to ``on_change``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from rma.agent import backup
from rma.agent.backoff import Backoff, jittered
from rma.agent.health import probe, probe_client
from rma.agent.model_pull import PullFailed, pull_ollama
from rma.agent.runtimes.base import Handle, Inside, Runtime, RuntimeFailure, free_port
from rma.schemas.api import ServiceSpec, ServiceStatus
from rma.schemas.enums import ServiceState

log = logging.getLogger("rma.agent")

#: A service that ran healthy this long before crashing restarts without the accumulated backoff.
STABLE_AFTER = 60.0


class _Crashed(Exception):
    """The instance ended or never became healthy; restart it with backoff."""


@dataclass(eq=False)
class Unit:
    """One assigned service on this agent."""

    spec: ServiceSpec
    state: ServiceState = ServiceState.PENDING
    healthy: bool = False
    message: str | None = None
    handle: Handle | None = None
    restarts: int = 0
    since: float = field(default_factory=time.time)
    task: asyncio.Task[None] | None = field(default=None, repr=False)
    backoff: Backoff = field(default_factory=lambda: Backoff(1.0, 60.0))
    #: This copy started from the pool's latest backup (a data service on a new holder).
    restored: bool = False

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def port(self) -> int | None:
        return self.handle.host_port if self.handle else None


class Reconciler:
    def __init__(
        self,
        runtime: Runtime,
        data_dir: Path,
        *,
        advertise_host: str = "127.0.0.1",
        health_timeout: float = 600.0,
        probe_interval: float = 5.0,
        stop_timeout: float = 10.0,
        restart_base: float = 1.0,
        restart_cap: float = 60.0,
        on_change: Callable[[Unit], None] | None = None,
        fetch_backup: Callable[[ServiceSpec, Path, str | None], Awaitable[bool]] | None = None,
    ) -> None:
        self.runtime = runtime
        #: Downloads a data service's backup (the newest, or the id given) into a file
        #: (``False``: none).
        self.fetch_backup = fetch_backup
        #: ``rma admin restore``: service -> the backup its copy here is replaced with; asked
        #: (``pending``), then, once the copy is stopped and moved aside, to fetch (``armed``).
        self.pending_restores: dict[str, str] = {}
        self._armed_restores: dict[str, str] = {}
        self.data_dir = data_dir
        self.advertise_host = advertise_host
        self.health_timeout = health_timeout
        self.probe_interval = probe_interval
        self.stop_timeout = stop_timeout
        self.restart_base = restart_base
        self.restart_cap = restart_cap
        self.on_change = on_change
        self.desired: dict[str, ServiceSpec] = {}
        self.units: dict[str, Unit] = {}
        #: Services stopped since the last report (reported once as ``stopped``).
        self.stopped: dict[str, ServiceStatus] = {}
        self._http: httpx.AsyncClient | None = None
        self._lock = asyncio.Lock()

    @property
    def http(self) -> httpx.AsyncClient:
        if self._http is None:
            self._http = probe_client()
        return self._http

    # --- the loop's one step ---------------------------------------------------------------------

    def set_desired(self, specs: Iterable[ServiceSpec]) -> bool:
        """Replace the desired assignments; ``True`` when they changed."""
        new = {s.name: s for s in specs}
        changed = new != self.desired
        self.desired = new
        return changed

    async def run_once(self) -> None:
        """Stop what is no longer wanted, start what is wanted and not running."""
        async with self._lock:
            doomed = [
                u
                for name, u in self.units.items()
                if name not in self.desired or self.desired[name] != u.spec
            ]
            if doomed:
                await self._stop_units(doomed, self.stop_timeout)
            if self.fetch_backup is not None:
                self._retire_stale()
                await self._replace_restored()
            for name, spec in self.desired.items():
                if name not in self.units:
                    unit = Unit(spec, backoff=Backoff(self.restart_base, self.restart_cap))
                    self.units[name] = unit
                    self.stopped.pop(name, None)
                    self._emit(unit)
                    unit.task = asyncio.create_task(self._supervise(unit), name=f"rma:{name}")

    async def stop_all(self, *, grace: float | None = None) -> None:
        """Stop every service (``grace=0``: kill at once; default: ``stop_timeout``)."""
        async with self._lock:
            self.desired = {}
            await self._stop_units(
                list(self.units.values()), self.stop_timeout if grace is None else grace
            )

    async def _stop_units(self, units: list[Unit], grace: float) -> None:
        """Stop ``units`` together; each leaves :attr:`units` only once it is stopped."""

        async def one(unit: Unit) -> None:
            await self._stop_unit(unit, grace)
            if self.units.get(unit.name) is unit:
                del self.units[unit.name]

        await asyncio.gather(*(one(u) for u in units))

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    # --- reporting -------------------------------------------------------------------------------

    def endpoint(self, unit: Unit, host: str | None = None) -> str | None:
        if unit.port is None:
            return None
        return f"http://{host or self.advertise_host}:{unit.port}"

    def local_endpoint(self, service: str) -> str | None:
        """The local base URL of a healthy service (for the tunnel), else ``None``."""
        unit = self.units.get(service)
        if unit is None or not unit.healthy:
            return None
        return self.endpoint(unit, "127.0.0.1")

    def local_tcp_endpoint(self, service: str) -> tuple[str, int] | None:
        """``(host, port)`` of a healthy ``kind = "tcp"`` service (for ``rma connect``)."""
        unit = self.units.get(service)
        if unit is None or not unit.healthy or unit.port is None or unit.spec.kind != "tcp":
            return None
        return "127.0.0.1", unit.port

    def statuses(self, inflight: Mapping[str, int] | None = None) -> list[ServiceStatus]:
        """Every unit's state for the heartbeat; ``inflight``: requests each serves right now
        (what the tunnel counts; the direct transport does not pass through the agent)."""
        counts = inflight or {}
        out = [
            ServiceStatus(
                name=u.name,
                state=u.state,
                healthy=u.healthy,
                inflight=counts.get(u.name, 0),
                endpoint=self.endpoint(u),
                message=(u.message or None) and u.message[:1000],
            )
            for u in self.units.values()
        ]
        out += [s for n, s in self.stopped.items() if n not in self.units]
        return out

    def forget_stopped(self, reported: Iterable[str]) -> None:
        for name in reported:
            self.stopped.pop(name, None)

    # --- one service -----------------------------------------------------------------------------

    def _set(
        self, unit: Unit, state: ServiceState, message: str | None = None, *, healthy: bool = False
    ) -> None:
        changed = unit.state is not state or unit.healthy != healthy
        unit.state, unit.healthy, unit.message = state, healthy, message
        if changed:
            unit.since = time.time()
            self._emit(unit)

    def _emit(self, unit: Unit) -> None:
        text = f"{unit.name}: {unit.state.value}" + (f" ({unit.message})" if unit.message else "")
        log.info(text)
        if self.on_change is not None:
            self.on_change(unit)

    async def _supervise(self, unit: Unit) -> None:
        while True:
            started = time.monotonic()
            try:
                await self._run_instance(unit)
                return  # not reached: _run_instance only ends by raising
            except RuntimeFailure as exc:
                await self._discard(unit)
                self._set(unit, ServiceState.FAILED, str(exc))
                return
            except _Crashed as exc:
                message = str(exc)
            except Exception as exc:  # a runtime's unexpected error: a crash, retried
                log.debug("%s: instance failed", unit.name, exc_info=True)
                message = f"{type(exc).__name__}: {exc}"
            await self._discard(unit)
            if time.monotonic() - started >= STABLE_AFTER:
                unit.backoff.reset()
            unit.restarts += 1
            delay = unit.backoff.next()
            self._set(unit, ServiceState.CRASHED, f"{message}; restart in {delay:.1f}s")
            await asyncio.sleep(delay)

    async def _run_instance(self, unit: Unit) -> None:
        spec = unit.spec

        def progress(line: str) -> None:
            self._set(unit, ServiceState.PULLING, line)

        await self.runtime.prepare(spec, progress)
        data_dir = self.service_dir(spec.name)
        restore = await self._fetch_restore(unit, data_dir)
        port = free_port()
        self._set(unit, ServiceState.STARTING, f"port {port}")
        unit.handle = await self.runtime.start(spec, port, data_dir)
        await self._wait_ready(unit)
        if restore is not None:
            await self._finish_restore(unit, data_dir, restore, port)
        if spec.model_pull == "ollama":
            for model in spec.models:
                self._set(unit, ServiceState.PULLING, f"pulling {model}")
                try:
                    await pull_ollama(self.http, port, model, progress)
                except PullFailed as exc:
                    raise _Crashed(str(exc)) from None
        self._set(unit, ServiceState.RUNNING, None, healthy=True)
        bad_since: float | None = None
        while True:
            await asyncio.sleep(jittered(self.probe_interval))
            await self._check_alive(unit, "")
            ok, seen = await probe(self.http, "127.0.0.1", port, spec.health)
            if ok:
                bad_since = None
                if unit.state is not ServiceState.RUNNING:
                    self._set(unit, ServiceState.RUNNING, None, healthy=True)
                continue
            now = time.monotonic()
            bad_since = bad_since or now
            self._set(unit, ServiceState.UNHEALTHY, seen)
            if now - bad_since > self.health_timeout:
                raise _Crashed(f"unhealthy for {self.health_timeout:.0f}s ({seen})")

    def request_restore(self, service: str, backup_id: str) -> None:
        """Replace this worker's copy of ``service`` with backup ``backup_id`` (at the next
        :meth:`run_once`: stop it, move its folder aside, start it from that backup)."""
        self.pending_restores[service] = backup_id

    async def _replace_restored(self) -> None:
        for name in list(self.pending_restores):
            unit = self.units.get(name)
            if unit is None or name not in self.desired:
                log.warning("%s: asked to restore a backup, but it does not run here", name)
                self.pending_restores.pop(name, None)
                continue
            backup_id = self.pending_restores.pop(name)
            log.warning("%s: replacing its copy with backup %s", name, backup_id)
            await self._stop_units([unit], self.stop_timeout)
            backup.retire(self.service_dir(name))
            self._armed_restores[name] = backup_id

    def _retire_stale(self) -> None:
        """Data services no longer assigned here: their folders move aside (never restarted
        stale: a new assignment restores the newest backup)."""
        keep = set(self.desired) | set(self.units)
        for name in backup.retire_stale(self.data_dir / "services", keep):
            log.warning("%s: no longer held here; its copy moved to services/.retired", name)

    def inside(self, unit: Unit) -> Inside | None:
        """Where the unit's backup tools run: in its container (docker), else on the host."""
        return None if unit.handle is None else self.runtime.inside(unit.handle, unit.spec)

    def service_dir(self, service: str) -> Path:
        return self.data_dir / "services" / service

    async def _fetch_restore(self, unit: Unit, data_dir: Path) -> Path | None:
        """A data service's first start here: fetch its newest backup (restored before it is
        reported healthy).  Fails (a crash, retried) when the coordinator cannot say: a fresh
        start would hide the backup behind an empty copy."""
        spec = unit.spec
        method = backup.method_of(spec)
        if self.fetch_backup is None or method is None:
            return None
        if not backup.needs_restore(data_dir):
            backup.mark(data_dir)
            return None
        dest = self.data_dir / "restore" / f"{spec.name}{method.suffix}"
        backup.begin_restore(data_dir, dest)
        backup.mark(data_dir)
        wanted = self._armed_restores.pop(spec.name, None)
        self._set(unit, ServiceState.STARTING, f"fetching backup {wanted or '(the newest)'}")
        try:
            found = await self.fetch_backup(spec, dest, wanted)
            if not found and wanted is not None:  # no longer kept: the newest, never empty
                log.warning("%s: backup %s is gone; restoring the newest", spec.name, wanted)
                found = await self.fetch_backup(spec, dest, None)
        except Exception as exc:
            raise _Crashed(f"cannot fetch its latest backup: {exc}") from None
        if not found:
            backup.end_restore(data_dir, None)
            return None
        if method.before_start:
            backup.restore_before_start(spec, data_dir, dest)
        log.warning("%s: restoring the pool's latest backup", spec.name)
        return dest

    async def _finish_restore(self, unit: Unit, data_dir: Path, src: Path, port: int) -> None:
        method = backup.method_of(unit.spec)
        assert method is not None
        if not method.before_start:
            self._set(unit, ServiceState.STARTING, "restoring its latest backup")
            try:
                await backup.restore_after_start(unit.spec, port, src, self.inside(unit), data_dir)
            except backup.BackupError as exc:
                raise _Crashed(str(exc)) from None
        backup.end_restore(data_dir, src)
        unit.restored = True

    async def _wait_ready(self, unit: Unit) -> None:
        assert unit.handle is not None
        deadline = time.monotonic() + self.health_timeout
        delay = 0.1
        while True:
            await self._check_alive(unit, " before it was healthy")
            ok, seen = await probe(self.http, "127.0.0.1", unit.handle.host_port, unit.spec.health)
            if ok:
                return
            if time.monotonic() >= deadline:
                raise _Crashed(f"not healthy after {self.health_timeout:.0f}s ({seen})")
            await asyncio.sleep(delay)
            delay = min(delay * 1.5, 2.0)

    async def _check_alive(self, unit: Unit, when: str) -> None:
        assert unit.handle is not None
        ended = await self.runtime.exit_status(unit.handle)
        if ended is None:
            return
        tail = await asyncio.to_thread(self.runtime.log_tail, unit.handle)
        raise _Crashed(f"{ended}{when}" + (f"; last output: {tail[-400:]}" if tail else ""))

    async def _discard(self, unit: Unit) -> None:
        """Remove a dead or failed instance (its process group, its container)."""
        handle, unit.handle = unit.handle, None
        with contextlib.suppress(Exception):
            await self.runtime.stop(unit.name, handle, grace=0)

    async def _stop_unit(self, unit: Unit, grace: float) -> None:
        task = unit.task
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._set(unit, ServiceState.STOPPING, None)
        try:
            await self.runtime.stop(unit.name, unit.handle, grace=grace)
            message = None
        except Exception as exc:
            message = f"stop failed: {type(exc).__name__}: {exc}"
            log.warning("%s: %s", unit.name, message)
        unit.handle = None
        self._set(unit, ServiceState.STOPPED, message)
        self.stopped[unit.name] = ServiceStatus(
            name=unit.name, state=ServiceState.STOPPED, healthy=False, message=message
        )
