"""The role matrix: anonymous, worker A, worker B, a client API key and the admin key on EVERY
route of the app (enumerated from ``app.routes``, the gateway's too).  No role gets a 2xx where it
has no business; refusals are JSON errors with the right status (401 no or bad credentials, 403 a
valid credential of the wrong role).  A route that this matrix does not know fails the test: add
it to ``POLICY`` when you add a route.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from starlette.routing import BaseRoute, Mount, WebSocketRoute
from starlette.websockets import WebSocketDisconnect

from rma.coordinator.app import create_app
from rma.coordinator.clock import FakeClock
from rma.settings import CoordinatorSettings

from .conftest import SERVICE_CAPS

ROLES = ("anonymous", "client", "worker_a", "worker_b", "admin")

#: Which roles may get a 2xx, by path (exact) or prefix (ending in "/").
PUBLIC = frozenset(ROLES)
POLICY: list[tuple[str, frozenset[str]]] = [
    ("/healthz", PUBLIC),
    ("/readyz", PUBLIC),
    ("/metrics", PUBLIC),
    ("/openapi.json", PUBLIC),
    ("/docs", PUBLIC),
    ("/docs/oauth2-redirect", PUBLIC),
    # registration needs a join token in the body; the matrix sends none
    ("/api/worker/register", frozenset()),
    ("/api/worker/", frozenset({"worker_a", "worker_b"})),
    ("/api/admin/", frozenset({"admin"})),
    ("/v1/", frozenset({"client"})),
    ("/api/services/", frozenset({"client"})),
    # coordinators relaying to each other's tunnels (an HMAC header, no role's credential)
    ("/api/internal/", frozenset()),
]


def allowed_roles(path: str) -> frozenset[str]:
    for pattern, roles in POLICY:
        if path == pattern or (pattern.endswith("/") and path.startswith(pattern)):
            return roles
    raise AssertionError(
        f"route {path} is not in the role matrix (tests/coordinator/test_roles.py)"
    )


@dataclass(frozen=True)
class RouteInfo:
    path: str
    methods: tuple[str, ...]
    websocket: bool


def all_routes(app: FastAPI) -> Iterator[RouteInfo]:
    """Every route, flattened (included routers and mounts too)."""
    try:
        from fastapi.routing import iter_route_contexts  # FastAPI with lazily included routers
    except ImportError:  # pragma: no cover - older FastAPI: app.routes is already flat
        contexts: list[tuple[BaseRoute, str]] = [(r, getattr(r, "path", "")) for r in app.routes]
    else:
        contexts = [(c.original_route, c.path) for c in iter_route_contexts(app.router.routes)]
    for route, path in contexts:
        if isinstance(route, Mount):
            raise AssertionError(f"mounted app at {path}: extend the matrix to walk into it")
        if isinstance(route, WebSocketRoute) or type(route).__name__ == "APIWebSocketRoute":
            yield RouteInfo(path, (), True)
            continue
        methods = getattr(route, "methods", None) or {"GET", "POST", "PUT", "DELETE"}
        yield RouteInfo(path, tuple(sorted(m for m in methods if m != "HEAD")), False)


@dataclass
class World:
    client: TestClient
    headers: dict[str, dict[str, str]]
    params: dict[str, str]


def make_world(client: TestClient, admin_key: str) -> World:
    """Fresh actors: worker A and B, a client key, a join token (earlier routes may have used
    theirs up: removed, left, revoked)."""
    admin = {"authorization": f"Bearer {admin_key}"}
    creds = {}
    for name in ("a", "b"):
        tok = client.post("/api/admin/tokens", json={"ttl": 600}, headers=admin).json()["token"]
        r = client.post(
            "/api/worker/register",
            json={"token": tok, "name": f"worker-{name}", "capabilities": SERVICE_CAPS},
        )
        assert r.status_code == 201, r.text
        creds[name] = r.json()
    key = client.post("/api/admin/keys", json={"name": "c"}, headers=admin).json()
    token = client.post("/api/admin/tokens", json={"ttl": 600}, headers=admin).json()
    headers = {
        "anonymous": {},
        "client": {"authorization": f"Bearer {key['key']}"},
        "worker_a": {"authorization": f"Bearer {creds['a']['credential']}"},
        "worker_b": {"authorization": f"Bearer {creds['b']['credential']}"},
        "admin": admin,
    }
    params = {
        "worker_id": creds["b"]["worker_id"],  # worker A aims at worker B: still no
        "token_id": token["id"],
        "key_id": key["id"],
        "service": "llm",
        "model": "smollm2-135m",
        "path": "health",
    }
    return World(client, headers, params)


def concrete(path: str, params: dict[str, str]) -> str:
    def fill(m: re.Match[str]) -> str:
        return params.get(m.group(1), "x")

    return re.sub(r"\{([a-zA-Z_]+)(?::[a-z]+)?\}", fill, path)


def body_for(path: str) -> dict[str, Any]:
    if path == "/api/worker/register":
        return {"name": "sneaky", "capabilities": SERVICE_CAPS}  # no token
    if path == "/api/admin/tokens":
        return {"ttl": 60}
    if path == "/api/admin/keys":
        return {"name": "k"}
    if path.startswith("/v1/"):
        return {"model": "smollm2-135m", "messages": [{"role": "user", "content": "hi"}]}
    return {}


def _subprotocols() -> list[str]:
    """The tunnel's subprotocol, so a worker's handshake is otherwise complete."""
    try:
        from rma.coordinator.tunnel_hub import SUBPROTOCOL
    except ImportError:
        return []
    return [SUBPROTOCOL]


def call(world: World, route: RouteInfo, method: str, role: str) -> tuple[int, Any]:
    url = concrete(route.path, world.params)
    headers = world.headers[role]
    if route.websocket:
        try:
            with world.client.websocket_connect(
                url, headers=headers, subprotocols=_subprotocols()
            ) as ws:
                ws.close()
        except WebSocketDisconnect as exc:
            status = getattr(exc, "status_code", None)  # denied with an HTTP response
            if status is not None:
                try:
                    return int(status), exc.json()  # type: ignore[attr-defined]
                except ValueError:
                    return int(status), None
            return 403 if exc.code == 1008 else 400, None
        return 101, None
    if method in ("POST", "PUT", "PATCH"):
        r = world.client.request(method, url, json=body_for(route.path), headers=headers)
    else:
        r = world.client.request(method, url, headers=headers)
    try:
        payload = r.json()
    except ValueError:
        payload = r.text
    return r.status_code, payload


ORDER = ("anonymous", "client", "worker_a", "worker_b", "admin")  # admin last: it may revoke


@pytest.fixture
def matrix_app(tmp_path: Path, database_url: str) -> Iterator[tuple[FastAPI, TestClient, str]]:
    # every route is called with bad credentials: no failed-auth limit may cut the matrix short
    settings = CoordinatorSettings(
        data_dir=tmp_path / "data",
        database_url=database_url,
        auth_fail_limit=100_000,
        auth_fail_address_limit=100_000,
    )
    app = create_app(settings, clock=FakeClock(), run_sweeper=False)
    with TestClient(app) as client:
        yield app, client, (settings.data_dir / "admin.key").read_text().strip()
    app.state.pool.engine.dispose()


def test_role_matrix_on_every_route(matrix_app: tuple[FastAPI, TestClient, str]) -> None:
    app, client, admin_key = matrix_app
    routes = list(all_routes(app))
    paths = {r.path for r in routes}
    # the control plane is all there (the enumeration really walks included routers)
    for must in ("/api/worker/heartbeat", "/api/admin/workers/{worker_id}", "/api/admin/events"):
        assert must in paths
    problems: list[str] = []
    checked = 0
    for route in routes:
        allowed = allowed_roles(route.path)
        for method in route.methods or ("WS",):
            world = make_world(client, admin_key)
            for role in ORDER:
                status, payload = call(world, route, method, role)
                checked += 1
                where = f"{method} {route.path} as {role}: {status}"
                if 200 <= status < 300 or status == 101:
                    if role not in allowed:
                        problems.append(f"{where} (unexpected success)")
                    continue
                if not (
                    isinstance(payload, dict)
                    and set(payload.get("error", {})) >= {"code", "message"}
                ):
                    problems.append(f"{where}: not a JSON error: {str(payload)[:100]}")
                if role == "anonymous" and allowed != PUBLIC and allowed and status != 401:
                    problems.append(f"{where}: anonymous should get 401")
                if role != "anonymous" and allowed and role not in allowed and status != 403:
                    problems.append(f"{where}: a valid {role} credential should get 403")
    assert checked > 100
    assert not problems, "\n".join(problems)


def test_a_worker_credential_never_opens_an_admin_route(
    matrix_app: tuple[FastAPI, TestClient, str],
) -> None:
    app, client, admin_key = matrix_app
    world = make_world(client, admin_key)
    for route in all_routes(app):
        if not route.path.startswith("/api/admin/"):
            continue
        for method in route.methods:
            for role in ("worker_a", "worker_b"):
                status, payload = call(world, route, method, role)
                assert status == 403, (method, route.path, role, payload)
                assert payload["error"]["code"] == "forbidden"


@pytest.mark.parametrize(
    "secret",
    [
        "rma_admin_not-the-key",
        "rma_key_000000000000.bogus",
        "rma_join_000000000000.bogus",
        "eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0.",
        "garbage",
    ],
)
def test_invalid_secrets_of_any_shape_are_401_not_403(
    matrix_app: tuple[FastAPI, TestClient, str], secret: str
) -> None:
    """Only a credential that verifies earns a 403; a lookalike is a failed attempt (401)."""
    _, client, _ = matrix_app
    auth = {"authorization": f"Bearer {secret}"}
    r = client.get("/api/admin/workers", headers=auth)
    assert r.status_code == 401, r.text
    assert r.headers["www-authenticate"] == "Bearer"
    r = client.post("/api/worker/heartbeat", json={}, headers=auth)
    assert r.status_code == 401, r.text


def test_unknown_ids_are_404_json(matrix_app: tuple[FastAPI, TestClient, str]) -> None:
    _, client, admin_key = matrix_app
    admin = {"authorization": f"Bearer {admin_key}"}
    for method, path in [
        ("GET", "/api/admin/workers/nope"),
        ("DELETE", "/api/admin/workers/nope"),
        ("POST", "/api/admin/workers/nope/drain"),
        ("POST", "/api/admin/workers/nope/undrain"),
        ("POST", "/api/admin/workers/nope/trust"),
        ("POST", "/api/admin/workers/nope/untrust"),
        ("DELETE", "/api/admin/tokens/nope"),
        ("DELETE", "/api/admin/keys/nope"),
        ("GET", "/api/no/such/route"),
    ]:
        r = client.request(method, path, headers=admin)
        assert r.status_code == 404, (method, path, r.text)
        assert r.json()["error"]["code"] == "not_found"
    r = client.put("/api/admin/workers", headers=admin)
    assert r.status_code == 405
    assert r.json()["error"]["code"] == "method_not_allowed"
