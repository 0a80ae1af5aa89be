"""Secrets (shown once, stored hashed), worker credentials (JWT), rate limits, body limits."""

from __future__ import annotations

import hashlib
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text

from rma.coordinator import security
from rma.coordinator.app import create_app
from rma.coordinator.clock import FakeClock
from rma.coordinator.db import sqlite_path
from rma.settings import CoordinatorSettings

from .conftest import SERVICE_CAPS, Api


def database_text(api: Api) -> str:
    """Every value of every table (and, for SQLite, the raw bytes of the files), as text."""
    from sqlmodel import SQLModel

    chunks: list[str] = []
    with api.pool.engine.connect() as conn:
        for table in SQLModel.metadata.sorted_tables:
            for row in conn.execute(text(f'SELECT * FROM "{table.name}"')):
                chunks.append(" ".join(map(str, row)))
    path = sqlite_path(api.pool.settings.db_url)
    if path is not None:
        for f in path.parent.glob(path.name + "*"):  # rma.db, rma.db-wal, rma.db-shm
            chunks.append(f.read_bytes().decode("latin-1"))
    return "\n".join(chunks)


def test_admin_key_file_is_0600_and_only_its_hash_is_stored(api: Api) -> None:
    key_file = api.pool.settings.data_dir / "admin.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    key = key_file.read_text().strip()
    assert key.startswith("rma_admin_")
    assert len(key) > 40
    dump = database_text(api)
    assert key not in dump
    assert hashlib.sha256(key.encode()).hexdigest() in dump


def test_admin_key_is_made_once(tmp_path: Path, database_url: str) -> None:
    settings = CoordinatorSettings(data_dir=tmp_path / "d", database_url=database_url)
    for _ in range(2):
        app = create_app(settings, run_sweeper=False)
        with TestClient(app):
            pass
        app.state.pool.engine.dispose()
        if _ == 0:
            first = (settings.data_dir / "admin.key").read_text()
    assert (settings.data_dir / "admin.key").read_text() == first


def test_token_and_key_secrets_are_shown_once_and_stored_hashed(api: Api) -> None:
    token = api.client.post(
        "/api/admin/tokens", json={"ttl": 600, "uses": 2, "label": "lbl"}, headers=api.admin
    ).json()
    key = api.client.post(
        "/api/admin/keys", json={"name": "app", "rpm": 5}, headers=api.admin
    ).json()
    w = api.register("w", token=token["token"])
    secrets = [token["token"], key["key"], w.secret]
    listings = [
        api.client.get("/api/admin/tokens", headers=api.admin).text,
        api.client.get("/api/admin/keys", headers=api.admin).text,
        api.client.get("/api/admin/workers", headers=api.admin).text,
        api.client.get(f"/api/admin/workers/{w.id}", headers=api.admin).text,
        api.client.get("/api/admin/events", headers=api.admin).text,
    ]
    dump = database_text(api)
    for secret in secrets:
        assert secret not in dump
        for listing in listings:
            assert secret not in listing
        assert security.hash_secret(secret) in dump
    assert token["id"] in listings[0]
    assert key["id"] in listings[1]


# --- worker credentials ---------------------------------------------------------------------------


def _claims(api: Api, **override: Any) -> dict[str, Any]:
    now = int(api.pool.clock.time())
    claims = {
        "iss": security.ISSUER,
        "aud": security.AUDIENCE,
        "sub": "",
        "iat": now,
        "exp": now + 600,
    }
    claims.update(override)
    return claims


def test_credential_is_an_hs256_jwt_with_issuer_audience_expiry(api: Api) -> None:
    w = api.register("w")
    header = jwt.get_unverified_header(w.credential)
    assert header["alg"] == "HS256"
    claims = jwt.decode(w.credential, options={"verify_signature": False})
    assert claims["iss"] == "rma-coordinator"
    assert claims["aud"] == "rma-worker"
    assert claims["sub"] == w.id
    assert claims["exp"] - claims["iat"] == int(api.pool.settings.credential_ttl)


@pytest.mark.parametrize("flaw", ["alg_none", "other_key", "wrong_aud", "wrong_iss", "no_exp"])
def test_forged_or_malformed_credentials_are_rejected(api: Api, flaw: str) -> None:
    w = api.register("w")
    key = api.pool.credentials.signing_key
    claims = _claims(api, sub=w.id)
    if flaw == "alg_none":
        forged = jwt.encode(claims, None, algorithm="none")
    elif flaw == "other_key":
        forged = jwt.encode(claims, "x" * 64, algorithm="HS256")
    elif flaw == "wrong_aud":
        forged = jwt.encode({**claims, "aud": "rma-admin"}, key, algorithm="HS256")
    elif flaw == "wrong_iss":
        forged = jwt.encode({**claims, "iss": "someone-else"}, key, algorithm="HS256")
    else:
        claims.pop("exp")
        forged = jwt.encode(claims, key, algorithm="HS256")
    r = api.client.post(
        "/api/worker/heartbeat", json={}, headers={"authorization": f"Bearer {forged}"}
    )
    assert r.status_code == 401, r.text
    assert r.json()["error"]["code"] == "invalid_credential"
    # the same claims signed properly do work (the test itself is sound)
    good = jwt.encode(_claims(api, sub=w.id), key, algorithm="HS256")
    ok = api.client.post(
        "/api/worker/heartbeat", json={}, headers={"authorization": f"Bearer {good}"}
    )
    assert ok.status_code == 200


def test_hs512_with_the_right_key_is_still_refused(api: Api) -> None:
    """The allow-list is explicit: only HS256."""
    w = api.register("w")
    forged = jwt.encode(_claims(api, sub=w.id), api.pool.credentials.signing_key, algorithm="HS512")
    r = api.client.post(
        "/api/worker/heartbeat", json={}, headers={"authorization": f"Bearer {forged}"}
    )
    assert r.status_code == 401


def test_credential_of_an_unknown_worker_is_401(api: Api) -> None:
    forged = jwt.encode(
        _claims(api, sub="feedfacefeedface"), api.pool.credentials.signing_key, algorithm="HS256"
    )
    r = api.client.post(
        "/api/worker/heartbeat", json={}, headers={"authorization": f"Bearer {forged}"}
    )
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "unknown_worker"


def test_credentials_survive_a_restart(tmp_path: Path, database_url: str) -> None:
    """The signing key is kept in the database: a restart does not log every worker out."""
    clock = FakeClock()
    settings = CoordinatorSettings(data_dir=tmp_path / "d", database_url=database_url)
    app = create_app(settings, clock=clock, run_sweeper=False)
    with TestClient(app) as client:
        api = Api(client, app, (settings.data_dir / "admin.key").read_text().strip())
        w = api.register("w")
    app.state.pool.engine.dispose()
    app2 = create_app(settings, clock=clock, run_sweeper=False)
    with TestClient(app2) as client:
        r = client.post("/api/worker/heartbeat", json={}, headers=w.headers)
        assert r.status_code == 200, r.text
    app2.state.pool.engine.dispose()


# --- rate limits ----------------------------------------------------------------------------------


@pytest.fixture
def limited(tmp_path: Path, database_url: str) -> Iterator[tuple[Any, str]]:
    settings = CoordinatorSettings(
        data_dir=tmp_path / "d", database_url=database_url, auth_fail_limit=3, auth_fail_window=60
    )
    app = create_app(settings, clock=FakeClock(), run_sweeper=False)
    with TestClient(app):
        yield app, (settings.data_dir / "admin.key").read_text().strip()
    app.state.pool.engine.dispose()


def test_failed_admin_auth_is_rate_limited_per_address(limited: tuple[Any, str]) -> None:
    app, key = limited
    attacker = TestClient(app, client=("203.0.113.7", 4444))
    other = TestClient(app, client=("198.51.100.1", 5555))
    good = {"authorization": f"Bearer {key}"}
    for _ in range(3):
        r = attacker.get("/api/admin/workers", headers={"authorization": "Bearer rma_admin_guess"})
        assert r.status_code == 401
    r = attacker.get("/api/admin/workers", headers={"authorization": "Bearer rma_admin_guess"})
    assert r.status_code == 429
    assert r.json()["error"]["code"] == "rate_limited"
    retry = int(r.headers["retry-after"])
    assert 1 <= retry <= 60
    # the right key is never refused for failures, from that address neither (a 256-bit key
    # cannot be guessed; a lock-out could be turned against the operator)
    assert attacker.get("/api/admin/workers", headers=good).status_code == 200
    # another address is not affected
    assert other.get("/api/admin/workers", headers=good).status_code == 200


def test_failed_registrations_are_rate_limited(limited: tuple[Any, str]) -> None:
    app, key = limited
    c = TestClient(app, client=("203.0.113.8", 4444))
    body = {"token": "rma_join_000000000000.nope", "name": "x", "capabilities": SERVICE_CAPS}
    statuses = [c.post("/api/worker/register", json=body).status_code for _ in range(4)]
    assert statuses == [401, 401, 401, 429]
    r = c.post("/api/worker/register", json=body)
    assert r.status_code == 429
    assert int(r.headers["retry-after"]) >= 1


def test_successful_auth_does_not_count(limited: tuple[Any, str]) -> None:
    app, key = limited
    c = TestClient(app, client=("203.0.113.9", 4444))
    for _ in range(10):
        assert (
            c.get("/api/admin/stats", headers={"authorization": f"Bearer {key}"}).status_code == 200
        )


def test_limiter_window_expires() -> None:
    import time

    from rma.coordinator.auth import FailureLimiter
    from rma.coordinator.errors import APIError

    lim = FailureLimiter(limit=2, window=0.2)
    lim.fail("a")
    lim.fail("a")
    with pytest.raises(APIError) as exc:
        lim.check("a")
    assert exc.value.status == 429
    assert exc.value.headers == {"Retry-After": "1"}
    time.sleep(0.25)
    lim.check("a")  # the window passed


# --- body size ----------------------------------------------------------------------------------


def _chunks(total: int, size: int = 64 * 1024) -> Iterator[bytes]:
    sent = 0
    while sent < total:
        n = min(size, total - sent)
        sent += n
        yield b" " * n


def test_body_over_the_limit_is_413_with_content_length(api: Api) -> None:
    limit = api.pool.settings.max_body_bytes
    r = api.client.post(
        "/api/admin/tokens",
        content=b" " * (limit + 1),
        headers={**api.admin, "content-type": "application/json"},
    )
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "too_large"


def test_chunked_body_over_the_limit_is_413_and_changes_nothing(api: Api) -> None:
    limit = api.pool.settings.max_body_bytes
    r = api.client.post(
        "/api/admin/tokens",
        content=_chunks(limit + 100),  # a generator: sent chunked, no Content-Length
        headers={**api.admin, "content-type": "application/json"},
    )
    assert r.status_code == 413, r.text
    assert r.json()["error"]["code"] == "too_large"
    assert api.client.get("/api/admin/tokens", headers=api.admin).json() == []


def test_body_under_the_limit_passes(api: Api) -> None:
    import json

    body = json.dumps({"ttl": 60, "label": "x" * 100}).encode()
    r = api.client.post(
        "/api/admin/tokens",
        content=iter([body[:10], body[10:]]),
        headers={**api.admin, "content-type": "application/json"},
    )
    assert r.status_code == 201, r.text
