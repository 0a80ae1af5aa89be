"""Workers' own gateway key for their pool-calling services (rag, notes, doc)."""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient

from rma.coordinator.app import create_app
from rma.settings import CoordinatorSettings

from .conftest import SERVICE_CAPS, Api


def _bearer(secret: str) -> dict[str, str]:
    return {"authorization": f"Bearer {secret}"}


def test_a_worker_gets_a_gateway_key_of_its_own_replaced_at_each_join(api: Api) -> None:
    w = api.register("alpha")
    key = w.body["service_key"]
    assert key.startswith("rma_key_")
    assert api.client.get("/v1/models", headers=_bearer(key)).status_code == 200
    # scoped to the gateway: not an admin key, not a worker credential
    assert api.client.get("/api/admin/workers", headers=_bearer(key)).status_code in (401, 403)
    assert api.client.post("/api/worker/heartbeat", json={}, headers=_bearer(key)).status_code in (
        401,
        403,
    )
    body = {"name": "alpha", "capabilities": SERVICE_CAPS, "worker_id": w.id,
            "worker_secret": w.secret}  # fmt: skip
    r = api.client.post("/api/worker/register", json=body)
    assert r.status_code == 201, r.text
    new = r.json()["service_key"]
    assert new and new != key
    assert api.client.get("/v1/models", headers=_bearer(key)).status_code == 401  # revoked
    assert api.client.get("/v1/models", headers=_bearer(new)).status_code == 200
    keys = api.client.get("/api/admin/keys", headers=api.admin).json()
    mine = [k for k in keys if k["name"] == f"worker services {w.id}"]
    assert [k["revoked"] for k in mine].count(False) == 1


def test_an_anonymous_pool_gives_no_key(tmp_path: Path, database_url: str) -> None:
    settings = CoordinatorSettings(
        data_dir=tmp_path / "data", database_url=database_url, anonymous_clients=True
    )
    with TestClient(create_app(settings, run_sweeper=False)) as client:
        admin = {"authorization": f"Bearer {(settings.data_dir / 'admin.key').read_text().strip()}"}
        token = client.post("/api/admin/tokens", json={}, headers=admin).json()["token"]
        r = client.post(
            "/api/worker/register",
            json={"token": token, "name": "w", "capabilities": SERVICE_CAPS},
        )
        assert r.status_code == 201, r.text
        assert r.json()["service_key"] is None
