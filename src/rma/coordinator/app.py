"""The app factory."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from rma import __version__
from rma.coordinator.auth import FailureLimiter
from rma.coordinator.backups import make_store
from rma.coordinator.clock import Clock
from rma.coordinator.errors import BodyLimitMiddleware, install_error_handlers
from rma.coordinator.gcpause import freeze_after_start
from rma.coordinator.methods import MethodsMiddleware
from rma.coordinator.metrics import Metrics
from rma.coordinator.pool import Pool
from rma.coordinator.routes import admin, ops, worker
from rma.coordinator.sweeper import Sweeper
from rma.settings import CoordinatorSettings

log = logging.getLogger("rma.coordinator")

#: Route prefixes that carry client payloads (bigger bodies allowed).
GATEWAY_PREFIXES = ("/v1/", "/api/services/", "/api/internal/relay/")
#: Uploads of data services' backups: their own size limit (``max_backup_bytes``).
BACKUPS_PREFIX = "/api/worker/backups/"


#: Seconds between two batches of heartbeats written to the database (Pool.flush_heartbeats).
HEARTBEAT_FLUSH_INTERVAL = 1.0


async def heartbeat_writer(pool: Pool) -> None:
    """Write the heartbeats left for later, about once a second (a lifespan task)."""
    import anyio

    while True:
        await asyncio.sleep(HEARTBEAT_FLUSH_INTERVAL)
        try:
            try:  # the last batch of heartbeats
                await anyio.to_thread.run_sync(pool.flush_heartbeats)
            except Exception:
                log.exception("writing the last heartbeats failed")
        except Exception:
            log.exception("writing heartbeats failed (tried again with the next batch)")


def create_app(
    settings: CoordinatorSettings | None = None,
    *,
    clock: Clock | None = None,
    pool: Pool | None = None,
    run_sweeper: bool = True,
) -> FastAPI:
    settings = settings or CoordinatorSettings()
    pool = pool or Pool(settings, clock=clock)
    sweeper = Sweeper(pool)
    background: list[Callable[[], Any]] = []

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        import anyio

        await anyio.to_thread.run_sync(pool.bootstrap)
        await anyio.to_thread.run_sync(pool.cluster.start)
        tasks = [asyncio.create_task(heartbeat_writer(pool))]
        tasks += [asyncio.create_task(sweeper.run())] if run_sweeper else []
        tasks += [asyncio.create_task(start()) for start in app.state.background]
        freeze_after_start(app.state)  # short GC pauses from here on (a serving process only)
        try:
            yield
        finally:
            # Loops first (a loop's thread call finishes before its task ends), then the
            # closers (the last usage flush, tunnels, Redis): nothing touches the database after.
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            try:  # the last batch of heartbeats
                await anyio.to_thread.run_sync(pool.flush_heartbeats)
            except Exception:
                log.exception("writing the last heartbeats failed")
            await anyio.to_thread.run_sync(pool.cluster.stop)
            for closer in app.state.on_shutdown:
                await closer()

    app = FastAPI(
        title="rma coordinator",
        version=__version__,
        lifespan=lifespan,
        docs_url="/docs",
        redoc_url=None,
    )
    app.state.pool = pool
    app.state.sweeper = sweeper
    app.state.metrics = Metrics()
    app.state.metrics.gauge(
        "rma_leader",
        "1 while this coordinator is the pool's leader (it sweeps and schedules), else 0.",
        lambda: [((), float(pool.cluster.is_leader))],
    )
    app.state.metrics.gauge(
        "rma_coordinators",
        "Live coordinators of the pool as this one counts them (1 on SQLite).",
        lambda: [((), float(pool.cluster.coordinators))],
    )
    app.state.auth_limiter = FailureLimiter(
        settings.auth_fail_limit, settings.auth_fail_window, settings.auth_fail_address_limit
    )
    app.state.stats_extensions = []
    app.state.background = background
    app.state.on_shutdown = []
    app.state.readiness = []  # async callables adding lines to /readyz's body
    app.state.backups = make_store(settings, pool.engine, pool.cluster.name)
    background.append(app.state.backups.start)
    app.state.on_shutdown.append(app.state.backups.aclose)
    app.state.readiness.append(app.state.backups.readiness)
    _share_keys(app, settings)
    install_error_handlers(app)
    app.add_middleware(
        BodyLimitMiddleware,
        default=settings.max_body_bytes,
        limits={
            **{p: settings.max_gateway_body_bytes for p in GATEWAY_PREFIXES},
            BACKUPS_PREFIX: settings.max_backup_bytes,
        },
    )
    app.add_middleware(MethodsMiddleware, schema=lambda: app.openapi())
    app.include_router(ops.router)
    app.include_router(worker.router)
    app.include_router(admin.router)
    _mount_gateway(app)
    return app


def _share_keys(app: FastAPI, settings: CoordinatorSettings) -> None:
    """Several coordinators over one database: keys made or revoked elsewhere reach this one
    (a reload every ``key_refresh_interval``; at once with Redis, which also shares limits)."""
    credentials = app.state.pool.credentials
    credentials.miss_ttl = settings.key_miss_ttl
    app.state.background.append(lambda: credentials.refresh_loop(settings.key_refresh_interval))
    app.state.shared = None
    if settings.redis_url:
        from rma.coordinator.shared import attach

        attach(app, settings)


def _mount_gateway(app: FastAPI) -> None:
    """The client gateway (``/v1/*``, ``/api/services/*``) and the tunnel hub, when present."""
    from rma.coordinator import openapi

    try:
        from rma.coordinator.gateway.mount import mount
    except ImportError:
        openapi.install(app)
        return
    gateway = mount(app)
    openapi.install(app, gateway.openapi_paths)
