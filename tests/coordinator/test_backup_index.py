"""The backups' index in the database: backups of an older version (JSON sidecars in the data
dir) are listed after the upgrade, and found by ``rma admin restore``."""

from __future__ import annotations

import json
import time
from pathlib import Path

from fastapi.testclient import TestClient

from rma.coordinator.app import create_app
from rma.coordinator.clock import FakeClock
from rma.settings import CoordinatorSettings


def test_sidecars_of_an_older_version_are_listed(
    settings: CoordinatorSettings, clock: FakeClock
) -> None:
    folder = Path(settings.data_dir) / "backups" / "redis"
    folder.mkdir(parents=True)
    stem = "1764601034123-w1"
    (folder / f"{stem}.bak").write_bytes(b"old snapshot")
    old = {  # as the store of before the index wrote it
        "id": stem,
        "service": "redis",
        "worker_id": "w1",
        "worker": "nas",
        "created_at": "2025-12-01T15:37:14.123000Z",
        "size": 12,
        "sha256": "ab" * 32,
    }
    (folder / f"{stem}.json").write_text(json.dumps(old))
    (folder / "1764601000000-w1.json").write_text("{}")  # a sidecar without its data: ignored

    app = create_app(settings, clock=clock, run_sweeper=False)
    with TestClient(app) as client:
        admin = {"authorization": f"Bearer {(settings.data_dir / 'admin.key').read_text()}"}
        deadline = time.monotonic() + 20
        while not (rows := client.get("/api/admin/backups", headers=admin).json()):
            assert time.monotonic() < deadline, "the sidecar was not listed"
            time.sleep(0.05)
        assert [(b["id"], b["worker"], b["size"]) for b in rows] == [(stem, "nas", 12)]
        assert rows[0]["location"].startswith("local:")
        r = client.post("/api/admin/backups/redis/restore", json={"at": stem}, headers=admin)
        assert r.status_code == 503 and r.json()["error"]["code"] == "no_worker", r.text
        r = client.post("/api/admin/backups/redis/restore", json={"at": "0-x"}, headers=admin)
        assert r.status_code == 404 and r.json()["error"]["code"] == "no_backup", r.text
    app.state.pool.engine.dispose()
