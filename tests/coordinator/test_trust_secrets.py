"""Secrets at rest: the signing key out of the database, private files, bounded credentials."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import jwt
import pytest
from fastapi.testclient import TestClient
from sqlmodel import select

from rma.coordinator import security
from rma.coordinator.app import create_app
from rma.coordinator.clock import FakeClock
from rma.coordinator.credentials import SIGNING_KEY
from rma.coordinator.db import session
from rma.coordinator.pool import Pool
from rma.coordinator.tables import Setting
from rma.settings import CoordinatorSettings

from .conftest import Api


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def setting_keys(pool: Pool) -> set[str]:
    with session(pool.engine) as s:
        return {row.key for row in s.exec(select(Setting)).all()}


def test_signing_key_in_a_private_file_and_private_database_files(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o755)
    os.chmod(data, 0o755)  # made before rma, world-readable
    settings = CoordinatorSettings(data_dir=data)  # SQLite in the data dir, whatever the CI runs
    pool = Pool(settings)
    try:
        pool.bootstrap()
        assert SIGNING_KEY not in setting_keys(pool)  # not in the database
        key_file = data / "signing.key"
        assert key_file.read_text().strip() == pool.credentials.signing_key
        assert len(pool.credentials.signing_key) >= 48
        assert mode(key_file) == 0o600
        assert mode(data) == 0o700
        files = [data / n for n in ("rma.db", "rma.db-wal", "rma.db-shm")]
        for f in files:
            assert f.exists(), f
            assert mode(f) == 0o600, (f, oct(mode(f)))
    finally:
        pool.engine.dispose()


def test_an_existing_database_key_moves_to_the_file_and_credentials_keep_working(
    tmp_path: Path,
) -> None:
    settings = CoordinatorSettings(data_dir=tmp_path / "data")
    old = Pool(settings)
    old.bootstrap()
    # what an older coordinator left: the key in the setting table, no file
    legacy = "legacy-signing-key-" + "x" * 40
    with session(old.engine) as s:
        s.add(Setting(key=SIGNING_KEY, value=legacy))
    (settings.data_dir / "signing.key").unlink()
    old.engine.dispose()

    new = Pool(settings)
    try:
        new.bootstrap()
        assert new.credentials.signing_key == legacy
        assert (settings.data_dir / "signing.key").read_text().strip() == legacy
        assert SIGNING_KEY not in setting_keys(new)
        token, _ = security.issue_credential(legacy, "w1", new.clock.time(), 900)
        assert security.verify_credential(new.credentials.signing_key, token, new.clock.time())
    finally:
        new.engine.dispose()


def test_an_operator_mounted_key_file_is_used(tmp_path: Path, database_url: str) -> None:
    mounted = tmp_path / "secrets" / "rma-signing.key"
    mounted.parent.mkdir()
    mounted.write_text("mounted-" + "k" * 40 + "\n")
    os.chmod(mounted, 0o600)
    settings = CoordinatorSettings(
        data_dir=tmp_path / "data", database_url=database_url, signing_key_file=mounted
    )
    pool = Pool(settings)
    try:
        pool.bootstrap()
        assert pool.credentials.signing_key == "mounted-" + "k" * 40
        assert SIGNING_KEY not in setting_keys(pool)
    finally:
        pool.engine.dispose()


def test_a_short_key_file_is_refused(tmp_path: Path, database_url: str) -> None:
    mounted = tmp_path / "short.key"
    mounted.write_text("short\n")
    settings = CoordinatorSettings(
        data_dir=tmp_path / "data", database_url=database_url, signing_key_file=mounted
    )
    pool = Pool(settings)
    try:
        with pytest.raises(ValueError, match="shorter than"):
            pool.bootstrap()
    finally:
        pool.engine.dispose()


def test_a_credential_living_longer_than_credential_ttl_is_refused(
    api: Api, clock: FakeClock
) -> None:
    w = api.register("w")
    now = int(clock.time())
    key = api.pool.credentials.signing_key
    claims = {
        "iss": security.ISSUER,
        "aud": security.AUDIENCE,
        "sub": w.id,
        "iat": now,
        "exp": now + 100 * 365 * 86400,  # a century
        "jti": "x",
    }
    century = jwt.encode(claims, key, algorithm="HS256")
    r = api.client.post(
        "/api/worker/heartbeat", json={}, headers={"authorization": f"Bearer {century}"}
    )
    assert r.status_code == 401
    assert "credential_ttl" in r.json()["error"]["message"]
    # one of exactly credential_ttl still works, and so does the one registration gave
    ttl = int(api.pool.settings.credential_ttl)
    fair = jwt.encode({**claims, "exp": now + ttl}, key, algorithm="HS256")
    ok = api.client.post(
        "/api/worker/heartbeat", json={}, headers={"authorization": f"Bearer {fair}"}
    )
    assert ok.status_code == 200, ok.text
    api.heartbeat(w)


def test_restart_keeps_the_key(tmp_path: Path, database_url: str) -> None:
    """A restarted coordinator signs with the same key: nobody is logged out."""
    settings = CoordinatorSettings(data_dir=tmp_path / "data", database_url=database_url)
    keys = []
    for _ in range(2):
        app = create_app(settings, clock=FakeClock(), run_sweeper=False)
        with TestClient(app):
            keys.append(app.state.pool.credentials.signing_key)
        app.state.pool.engine.dispose()
    assert keys[0] == keys[1]
