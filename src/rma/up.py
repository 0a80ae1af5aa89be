"""``rma up``: a coordinator and one local worker in one process, one command.

The coordinator serves on loopback with anonymous clients (nobody else can reach it); the worker
runs the built-in services that are installed as local processes.  Ctrl-C makes the worker leave
(its services stop), then the coordinator stops.  A second ``rma up`` reuses the data dir: the
same admin key, the same worker, no new token.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import os
import signal
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rma.settings import CoordinatorSettings, WorkerSettings

if TYPE_CHECKING:
    import uvicorn

    from rma.agent.agent import Agent
    from rma.coordinator.pool import Pool

#: What ``rma up`` runs when ``--services`` is not given: the built-in services.
DEFAULT_SERVICES = ("llm", "embeddings", "ocr", "ner", "doc", "rag", "notes")
LOCAL_WORKER = "local"


class UpError(Exception):
    """``rma up`` cannot start; the message says why."""


LOCK_FILE = "up.lock"


class DataDirLock:
    """An exclusive ``flock`` on ``<data-dir>/up.lock``: one ``rma up`` per data dir."""

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            pid = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise UpError(
                f"another rma up (pid {pid}) is running with the data dir {self.path.parent}: "
                "stop it, or pass a different --data-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def check_port_free(host: str, port: int) -> None:
    """Raise :class:`UpError` when (host, port) cannot be bound (another pool holds it)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise UpError(f"cannot listen on {host}: {exc}") from None
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise UpError(
                    f"port {port} on {host} is in use (another rma up or coordinator?): "
                    "stop it, or pass --port"
                ) from None
            raise UpError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class UpOptions:
    host: str = "127.0.0.1"
    port: int = 8420
    data_dir: Path | None = None
    services: list[str] | None = None
    catalog: Path | None = None
    worker: bool = True
    log_level: str = "warning"
    ready_timeout: float = 900.0


def _quiet_server(settings: CoordinatorSettings, pool: Pool, log_level: str) -> uvicorn.Server:
    import uvicorn

    from rma.coordinator.app import create_app
    from rma.coordinator.serve import server_config

    class Server(uvicorn.Server):
        """uvicorn without its own signal handlers: ``rma up`` stops the worker first."""

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield

    app = create_app(settings, pool=pool)
    config = server_config(settings, app, log_level)
    return Server(config)


class LocalPool:
    """The coordinator and the local worker, run together by :meth:`run`."""

    def __init__(self, opts: UpOptions, *, say: Callable[[str], None] = print) -> None:
        from pydantic import ValidationError

        self.opts = opts
        self.say = say
        try:
            self.settings = CoordinatorSettings.load(
                host=opts.host,
                port=opts.port,
                data_dir=opts.data_dir,
                catalog=opts.catalog,
                anonymous_clients=is_loopback(opts.host),
            )
        except ValidationError as exc:
            raise UpError(str(exc.errors()[0]["msg"])) from None
        self.pool: Pool | None = None
        self.server: uvicorn.Server | None = None
        self.agent: Agent | None = None
        self._stop = asyncio.Event()
        self._lock = DataDirLock(self.settings.data_dir)

    # --- building --------------------------------------------------------------------------------

    def start_coordinator(self) -> None:
        from rma.catalog import CatalogError
        from rma.coordinator.pool import Pool

        try:
            pool = Pool(self.settings)
            created = pool.bootstrap()
        except CatalogError as exc:
            raise UpError(str(exc)) from None
        except Exception as exc:
            raise UpError(f"cannot open the database in {self.settings.data_dir}: {exc}") from None
        key_file = self.settings.data_dir / "admin.key"
        self.say(f"admin key {'created in' if created else 'in'} {key_file}")
        self.pool = pool
        self.server = _quiet_server(self.settings, pool, self.opts.log_level)

    def worker_settings(self) -> WorkerSettings:
        services = self.opts.services or list(DEFAULT_SERVICES)
        return WorkerSettings(
            coordinator_url=self.settings.url,
            name=LOCAL_WORKER,
            labels={"rma.services": ",".join(services)},
            runtime="process",
            transport="direct",
            catalog=self.opts.catalog,
            data_dir=self.settings.data_dir / "worker",
            trust_coordinator_catalog=True,  # the donor runs this coordinator: one catalog
        )

    def build_agent(self) -> Agent:
        from rma.agent.agent import Agent
        from rma.agent.hardware import detect
        from rma.agent.runtimes import ProcessRuntime
        from rma.agent.state import load_identity

        assert self.pool is not None
        ws = self.worker_settings()
        ident = load_identity(ws.data_dir)
        if ident is None or ident.coordinator_url != ws.coordinator_url:
            token = self.pool.credentials.create_token(ttl=600, uses=1, label="rma up")
            ws = ws.model_copy(update={"token": token.token})
        found = detect(ws.data_dir)
        return Agent(
            ws,
            runtime=ProcessRuntime(ws.data_dir),
            catalog=self.pool.catalog,
            capabilities=found.capabilities,
            probe_interval=1.0,
            reconcile_interval=2.0,
        )

    # --- running ---------------------------------------------------------------------------------

    def request_stop(self) -> None:
        if self._stop.is_set():  # second Ctrl-C: at once
            if self.agent is not None:
                self.agent.request_stop()
            if self.server is not None:
                self.server.force_exit = True
        self._stop.set()
        if self.agent is not None:
            self.agent.request_stop()

    def service_states(self) -> dict[str, str]:
        """Each assigned service's state on the local worker (from the routing table)."""
        if self.pool is None:
            return {}
        worker = next(
            (
                w
                for w in self.pool.registry.all()
                if w.name == LOCAL_WORKER and w.status.value in ("online", "draining")
            ),
            None,
        )
        if worker is None:
            return {}
        states = {name: "pending" for name in worker.assignments}
        for name, st in worker.services.items():
            states[name] = "ready" if st.healthy else st.state.value
        return states

    async def run(
        self,
        on_ready: Callable[[float], None] | None = None,
        progress: Callable[[dict[str, str]], None] | None = None,
    ) -> int:
        from rma.agent.state import StateError

        check_port_free(self.settings.host, self.settings.port)
        self._lock.acquire()
        try:
            return await self._run(on_ready, progress)
        except StateError as exc:  # the worker's data dir is held by another agent
            raise UpError(str(exc)) from None
        finally:
            self._lock.release()

    async def _serve(self) -> None:
        """uvicorn's serve, its start-up failure (a bare ``sys.exit``) as an exception."""
        assert self.server is not None
        try:
            await self.server.serve()
        except SystemExit as exc:
            raise UpError(f"the coordinator did not start on {self.settings.url}") from exc

    async def _run(
        self,
        on_ready: Callable[[float], None] | None,
        progress: Callable[[dict[str, str]], None] | None,
    ) -> int:
        self.start_coordinator()
        assert self.server is not None
        started = time.monotonic()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.request_stop)
        server_task = asyncio.create_task(self._serve())
        while not self.server.started:
            if server_task.done():
                exc = server_task.exception()
                if isinstance(exc, UpError):
                    raise exc
                raise UpError(f"the coordinator did not start on {self.settings.url}: {exc}")
            await asyncio.sleep(0.05)
        self.say(f"coordinator at {self.settings.url}")
        code = 0
        try:
            if not self.opts.worker:
                if on_ready:
                    on_ready(time.monotonic() - started)
                await self._stop.wait()
                return 0
            self.agent = self.build_agent()
            async with self.agent:
                agent_task = asyncio.create_task(self.agent.run())
                watcher = asyncio.create_task(self._watch(started, on_ready, progress))
                try:
                    code = int(await agent_task or 0)
                except asyncio.CancelledError:
                    if not self.agent.forced:  # a second Ctrl-C cancels the agent: not an error
                        raise
                    code = 130
                finally:
                    watcher.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await watcher
        finally:
            self.server.should_exit = True
            with contextlib.suppress(asyncio.CancelledError, SystemExit, UpError):
                await server_task
        return code

    async def _watch(
        self,
        started: float,
        on_ready: Callable[[float], None] | None,
        progress: Callable[[dict[str, str]], None] | None,
    ) -> None:
        """Report service states until every assigned service is ready (or failed)."""
        last: dict[str, str] = {}
        while True:
            states = self.service_states()
            if states != last and progress:
                progress(states)
            last = states
            if states and all(s in ("ready", "failed", "refused") for s in states.values()):
                if on_ready:
                    on_ready(time.monotonic() - started)
                return
            await asyncio.sleep(0.25)


def summary(states: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(states.items())) or "waiting for the worker"
