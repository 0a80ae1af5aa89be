"""Attach the gateway to the coordinator app: routes, metrics, usage stats, background flush."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastapi import FastAPI
from starlette.routing import Route, WebSocketRoute

from rma.coordinator.gateway.asgi import Endpoint
from rma.coordinator.gateway.connect import CONNECT_PATH, DataConnections
from rma.coordinator.gateway.openapi import SERVICE_METHODS
from rma.coordinator.gateway.proxy import (
    BROKEN,
    ERRORS,
    FIRST_BYTE,
    LATENCY,
    OPENAI_PATHS,
    QUEUE_WAIT,
    REQUESTS,
    RETRIES,
    Gateway,
)
from rma.coordinator.metrics import Labels
from rma.schemas.enums import WorkerStatus

if TYPE_CHECKING:
    from rma.coordinator.cluster.relay import RelayUpstream
    from rma.coordinator.tunnel_hub import TunnelHub


def mount(app: FastAPI) -> Gateway:
    state = app.state
    pool = state.pool
    gateway = Gateway(pool, pool.settings, state.metrics, state.auth_limiter)
    if getattr(state, "shared", None) is not None:  # several coordinators: limits in Redis
        gateway.limiter = state.shared.limiter
    state.gateway = gateway
    from rma.coordinator.tunnel_hub import mount_tunnel  # GET /api/worker/tunnel

    hub = mount_tunnel(app)
    gateway.add_upstream(hub)
    relay = None
    if pool.cluster.shared:  # several coordinators: the others' tunnels, through them
        from rma.coordinator.cluster.relay import mount_relay

        relay = mount_relay(app, hub)
        gateway.add_upstream(relay)
    _share_cooldowns(app, gateway, hub, relay)

    models = Endpoint(gateway.models)
    openai = Endpoint(gateway.openai)
    service = Endpoint(gateway.service)
    endpoint = Endpoint(gateway.endpoint)
    data = gateway.data = DataConnections(gateway)
    routes = [
        # a raw ASGI endpoint: the byte pump talks to the server without per-message wrappers
        WebSocketRoute(CONNECT_PATH, data, name="gateway_service_connect"),
        Route("/v1/models", models, methods=["GET"], name="gateway_models"),
        Route("/v1/models/{model:path}", models, methods=["GET"], name="gateway_model"),
        *(Route(p, openai, methods=["POST"], name=f"gateway{p}") for p in OPENAI_PATHS),
        Route(
            "/api/services/{service}", service, methods=SERVICE_METHODS, name="gateway_service_root"
        ),
        Route(
            "/api/services/{service}/{path:path}",
            service,
            methods=SERVICE_METHODS,
            name="gateway_service",
        ),
        # Last of the gateway's: the paths above match first (POST /v1/chat/completions...).
        Route("/v1/{path:path}", endpoint, methods=SERVICE_METHODS, name="gateway_endpoint"),
    ]
    app.router.routes[0:0] = routes  # first: the hot path matches at once

    _register_metrics(gateway)
    state.stats_extensions.append(lambda: _usage_stats(gateway))
    state.background.append(gateway.usage.run)
    balancer = gateway.balancer
    state.background.append(
        lambda: gateway.pool.scheduler.scale_forever(
            lambda: (balancer.inflight_by_service(), balancer.queued_by_service())
        )
    )
    state.background.append(gateway.ledger.run)
    pool.on_status_change.append(gateway.ledger.on_worker_change)  # quarantine: forfeit
    pool.credits_of = gateway.ledger.worker_balance  # the donor's own, in the heartbeat answer
    pool.cached_credits_of = gateway.ledger.cached_balance  # the same from memory (the loop's)
    state.on_shutdown.append(gateway.aclose)
    return gateway


def _share_cooldowns(
    app: FastAPI, gateway: Gateway, hub: TunnelHub, relay: RelayUpstream | None
) -> None:
    """Cool-downs to and from the other coordinators; a new tunnel lifts the old marks; with
    ``split_capacity``, this coordinator's share of each worker's capacity."""
    from rma.coordinator.cluster.cooldowns import CoolShare
    from rma.coordinator.cluster.node import Node

    state = app.state
    node = state.pool.cluster
    shared = getattr(state, "shared", None)
    share = CoolShare(
        gateway.balancer,
        node if isinstance(node, Node) else None,
        shared.events if shared is not None else None,
        relay.tunnels if relay is not None else None,
        relay.own_url if relay is not None else "",
    )
    share.install()
    if isinstance(node, Node) and state.pool.settings.split_capacity:
        balancer = gateway.balancer

        def split(count: int) -> None:
            balancer.split = count

        node.on_coordinators.append(split)
    hub.on_attach.append(share.attached)
    state.background.append(share.start)
    state.cooldowns = share


def _usage_stats(gateway: Gateway) -> dict[str, Any]:
    names = {w.id: w.name for w in gateway.pool.registry.all()}
    return gateway.usage.stats(names)


def _register_metrics(gateway: Gateway) -> None:
    m = gateway.metrics
    m.describe(REQUESTS, "Gateway requests by service and HTTP status.")
    m.describe(LATENCY, "Gateway request latency in seconds, to the last byte.")
    m.describe(FIRST_BYTE, "Seconds until the worker's response headers, by service.")
    m.describe(RETRIES, "Requests retried on another worker, by service.")
    m.describe(BROKEN, "Streams broken after their first byte (worker failed or stalled).")
    m.describe(ERRORS, "Gateway answers with status >= 400, by service and error code.")
    m.describe(QUEUE_WAIT, "Seconds a request waited for a worker's free slot, by service.")

    def inflight() -> list[tuple[Labels, float]]:
        counts = gateway.balancer.inflight_by_service()
        return [((("service", s),), float(n)) for s, n in sorted(counts.items())]

    def queued() -> list[tuple[Labels, float]]:
        counts = gateway.balancer.queued_by_service()
        total = [((), float(gateway.balancer.queued))]
        return total + [((("service", s),), float(n)) for s, n in sorted(counts.items())]

    def replicas() -> list[tuple[Labels, float]]:
        balancer = gateway.balancer
        rows = gateway.pool.services(balancer.inflight_by_service(), balancer.queued_by_service())
        return [
            ((("service", row["name"]), ("state", state)), float(row[state]))
            for row in rows
            for state in ("wanted", "assigned", "healthy")
        ]

    def per_worker() -> list[tuple[Labels, float]]:
        counts: dict[str, int] = {}
        for (worker_id, _), n in gateway.balancer.inflight.items():
            counts[worker_id] = counts.get(worker_id, 0) + n
        return [
            ((("worker", w.name), ("status", w.status.value)), float(counts.get(w.id, 0)))
            for w in sorted(gateway.pool.registry.all(), key=lambda w: w.name)
            if w.status not in (WorkerStatus.LEFT, WorkerStatus.REMOVED)
        ]

    def connections() -> list[tuple[Labels, float]]:
        by_service = gateway.data.by_service
        return [((("service", s),), float(n)) for s, n in sorted(by_service.items())]

    m.gauge(
        "rma_data_connections", "TCP connections open to data services (rma connect).", connections
    )

    def cooling() -> list[tuple[Labels, float]]:
        registry = gateway.pool.registry
        out: list[tuple[Labels, float]] = []
        for (worker_id, service), left in sorted(gateway.balancer.cooling_now().items()):
            worker = registry.get(worker_id)
            name = worker.name if worker is not None else worker_id
            out.append(((("worker", name), ("service", service)), left))
        return out

    m.gauge(
        "rma_worker_cooldown_seconds",
        "Seconds left of each worker service's cool-down on this coordinator (its own, or "
        "heard from another coordinator); absent when none.",
        cooling,
    )
    m.gauge("rma_gateway_inflight", "Requests in flight to workers, by service.", inflight)
    m.gauge("rma_gateway_queue_depth", "Requests waiting for worker capacity.", queued)
    m.gauge(
        "rma_service_replicas",
        "Replicas per catalog service: wanted (by the scheduler), assigned, healthy.",
        replicas,
    )
    m.gauge(
        "rma_worker_inflight",
        "Requests in flight from this coordinator, per worker (every worker not left/removed).",
        per_worker,
    )
