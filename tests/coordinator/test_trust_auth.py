"""Failed-auth limiting that cannot be turned against others.

A valid credential is never refused because of failures (anyone's from the same address, behind
one NAT or proxy); bad credentials are limited per role and address, per address, and per join
token.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
from fastapi.testclient import TestClient

from rma.coordinator.app import create_app
from rma.coordinator.clock import FakeClock
from rma.settings import CoordinatorSettings

from .conftest import SERVICE_CAPS, start_coordinator


def test_fifty_bad_requests_do_not_lock_out_valid_ones_from_the_same_address(
    tmp_path: Path, database_url: str
) -> None:
    coord = start_coordinator(tmp_path / "coord", database_url=database_url)
    try:
        with coord.admin() as admin:
            key = admin.post("/api/admin/keys", json={"name": "c", "rpm": 0}).json()["key"]
        body = {"token": coord.token(), "name": "w", "capabilities": SERVICE_CAPS}
        reg = httpx.post(coord.url + "/api/worker/register", json=body, timeout=10)
        assert reg.status_code == 201, reg.text
        worker = {"authorization": f"Bearer {reg.json()['credential']}"}

        bad = {"authorization": "Bearer bad"}
        attempts = [
            ("GET", "/api/admin/workers", None, bad),
            ("POST", "/api/worker/heartbeat", {}, bad),
            ("GET", "/v1/models", None, bad),
            ("GET", "/v1/models", None, {"authorization": "Bearer rma_key_000000000000.x"}),
            (
                "POST",
                "/api/worker/register",
                {"token": "rma_join_000000000000.nope", "name": "x", "capabilities": SERVICE_CAPS},
                None,
            ),
        ]
        statuses: list[int] = []
        with httpx.Client(base_url=coord.url, timeout=10) as c:
            for i in range(50):
                method, path, payload, headers = attempts[i % len(attempts)]
                r = c.request(method, path, json=payload, headers=headers)
                statuses.append(r.status_code)
            assert set(statuses) == {401, 429}, statuses
            assert statuses.count(429) > 0  # the limits bit

            # all from 127.0.0.1, all valid: all served
            hb = c.post("/api/worker/heartbeat", json={}, headers=worker)
            assert hb.status_code == 200, hb.text
            adm = c.get(
                "/api/admin/workers", headers={"authorization": f"Bearer {coord.admin_key}"}
            )
            assert adm.status_code == 200, adm.text
            cli = c.get("/v1/models", headers={"authorization": f"Bearer {key}"})
            assert cli.status_code == 200, cli.text
            rejoin = {"token": coord.token(), "name": "w2", "capabilities": SERVICE_CAPS}
            assert c.post("/api/worker/register", json=rejoin).status_code == 201

            # and bad attempts still get 429, with Retry-After, on every role
            for method, path, payload, headers in attempts:
                r = c.request(method, path, json=payload, headers=headers)
                assert r.status_code == 429, (path, r.text)
                assert int(r.headers["retry-after"]) >= 1
                assert r.json()["error"]["code"] == "rate_limited"
    finally:
        coord.stop()


def _app(tmp_path: Path, database_url: str, **kw: Any) -> Any:
    settings = CoordinatorSettings(data_dir=tmp_path / "d", database_url=database_url, **kw)
    return create_app(settings, clock=FakeClock(), run_sweeper=False), settings


def test_limits_are_per_role_per_address_and_per_join_token(
    tmp_path: Path, database_url: str
) -> None:
    app, settings = _app(tmp_path, database_url, auth_fail_limit=3, auth_fail_address_limit=7)
    with TestClient(app) as base:
        admin_key = (settings.data_dir / "admin.key").read_text().strip()
        admin = {"authorization": f"Bearer {admin_key}"}
        a = TestClient(app, client=("203.0.113.1", 1000))
        b = TestClient(app, client=("203.0.113.2", 1000))
        bad = {"authorization": "Bearer nope"}

        # per role: admin failures fill the admin bucket only
        assert [a.get("/api/admin/stats", headers=bad).status_code for _ in range(4)] == [
            401, 401, 401, 429,
        ]  # fmt: skip
        assert a.get("/v1/models", headers=bad).status_code == 401  # the client bucket is free
        # per address: 3 admin + 1 client = 4; three more client failures reach 7 in all
        assert [a.get("/v1/models", headers=bad).status_code for _ in range(2)] == [401, 401]
        assert a.post("/api/worker/heartbeat", json={}, headers=bad).status_code == 401
        assert a.post("/api/worker/heartbeat", json={}, headers=bad).status_code == 429
        # another address is not concerned
        assert b.get("/api/admin/stats", headers=bad).status_code == 401

        # per join token: one token's failures from many addresses fill its bucket...
        r = base.post("/api/admin/tokens", json={"ttl": 600, "uses": 5}, headers=admin)
        token = r.json()["token"]
        wrong = token.rsplit(".", 1)[0] + ".wrong"
        body = {"token": wrong, "name": "x", "capabilities": SERVICE_CAPS}
        codes = [
            TestClient(app, client=(f"198.51.100.{i}", 1))
            .post("/api/worker/register", json=body)
            .status_code
            for i in range(4)
        ]
        assert codes == [401, 401, 401, 429]
        # ...and the right token still joins, even from a locked-out address
        ok = {"token": token, "name": "y", "capabilities": SERVICE_CAPS}
        assert a.post("/api/worker/register", json=ok).status_code == 201
        assert a.get("/api/admin/stats", headers=admin).status_code == 200
    app.state.pool.engine.dispose()
