"""The coordinator app in-process (``TestClient`` drives the real ASGI app, lifespan included).

Every test here gets its own data dir and database: SQLite in ``tmp_path``, or the PostgreSQL
database named by ``RMA_TEST_DATABASE_URL`` (emptied first) through the ``database_url`` fixture.
Time is a :class:`FakeClock`; the sweeper does not run by itself (``app.state.sweeper.run_once()``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from tests.conftest import Coordinator, free_port, start_coordinator  # noqa: F401 (re-exported)

from rma.coordinator.app import create_app
from rma.coordinator.clock import FakeClock
from rma.settings import CoordinatorSettings

#: A tier-2 ("service") machine.
SERVICE_CAPS: dict[str, Any] = {"cpu_cores": 4, "memory_mb": 8192, "disk_free_mb": 50_000}
#: A tier-3 ("data") machine.
DATA_CAPS: dict[str, Any] = {"cpu_cores": 1, "memory_mb": 3072}
#: A tier-1 ("gpu") machine.
GPU_CAPS: dict[str, Any] = {
    "cpu_cores": 16,
    "memory_mb": 65536,
    "gpus": [{"name": "NVIDIA RTX 4090", "memory_mb": 24564}],
}
#: Below every tier.
TINY_CAPS: dict[str, Any] = {"cpu_cores": 1, "memory_mb": 1024}


@dataclass
class Registered:
    id: str
    credential: str
    secret: str
    body: dict[str, Any]

    @property
    def headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.credential}"}


class Api:
    """A thin helper over the TestClient: the admin key, tokens, registration, heartbeats."""

    def __init__(self, client: TestClient, app: FastAPI, admin_key: str) -> None:
        self.client = client
        self.app = app
        self.admin_key = admin_key
        self.admin = {"authorization": f"Bearer {admin_key}"}

    @property
    def pool(self) -> Any:
        return self.app.state.pool

    def token(self, uses: int | None = 10, ttl: float = 600, label: str = "test") -> str:
        r = self.client.post(
            "/api/admin/tokens", json={"ttl": ttl, "uses": uses, "label": label}, headers=self.admin
        )
        assert r.status_code == 201, r.text
        return str(r.json()["token"])

    def register(
        self,
        name: str = "w1",
        caps: dict[str, Any] | None = None,
        *,
        token: str | None = None,
        expect: int = 201,
        **extra: Any,
    ) -> Any:
        body = {
            "token": token if token is not None else self.token(),
            "name": name,
            "capabilities": caps or SERVICE_CAPS,
            **extra,
        }
        r = self.client.post("/api/worker/register", json=body)
        assert r.status_code == expect, r.text
        if expect != 201:
            return r
        data = r.json()
        return Registered(data["worker_id"], data["credential"], data["worker_secret"], data)

    def heartbeat(self, worker: Registered, expect: int = 200, **body: Any) -> Any:
        r = self.client.post("/api/worker/heartbeat", json=body, headers=worker.headers)
        assert r.status_code == expect, r.text
        return r.json()

    def workers(self, **params: Any) -> list[dict[str, Any]]:
        r = self.client.get("/api/admin/workers", params=params, headers=self.admin)
        assert r.status_code == 200, r.text
        return list(r.json())

    def worker(self, worker_id: str) -> dict[str, Any]:
        r = self.client.get(f"/api/admin/workers/{worker_id}", headers=self.admin)
        assert r.status_code == 200, r.text
        return dict(r.json())

    def events(self, kind: str | None = None) -> list[dict[str, Any]]:
        r = self.client.get("/api/admin/events", params={"limit": 1000}, headers=self.admin)
        assert r.status_code == 200, r.text
        return [e for e in r.json() if kind is None or e["kind"] == kind]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def settings(tmp_path: Path, database_url: str) -> CoordinatorSettings:
    return CoordinatorSettings(data_dir=tmp_path / "data", database_url=database_url)


@pytest.fixture
def app(settings: CoordinatorSettings, clock: FakeClock) -> FastAPI:
    return create_app(settings, clock=clock, run_sweeper=False)


@pytest.fixture
def client(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app) as c:
        yield c
    app.state.pool.engine.dispose()


@pytest.fixture
def api(client: TestClient, app: FastAPI, settings: CoordinatorSettings) -> Api:
    key = (settings.data_dir / "admin.key").read_text().strip()
    return Api(client, app, key)


@dataclass
class TlsFiles:
    ca: Path
    cert: Path
    key: Path


def make_tls_files(where: Path) -> TlsFiles:
    """A private CA and a server certificate for 127.0.0.1, made with the ``openssl`` CLI."""
    import shutil
    import subprocess

    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("the openssl command is missing (apt-get install openssl)")
    where.mkdir(parents=True, exist_ok=True)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], cwd=where, check=True, capture_output=True)

    run(
        "req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
        "-subj", "/CN=rma test CA",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip
    run("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1")
    (where / "ext.cnf").write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\n"
        "authorityKeyIdentifier=keyid,issuer\n"
        "subjectKeyIdentifier=hash\n"
    )
    run(
        "x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-CAcreateserial", "-out", "server.pem", "-days", "2", "-extfile", "ext.cnf",
    )  # fmt: skip
    return TlsFiles(ca=where / "ca.pem", cert=where / "server.pem", key=where / "server.key")
