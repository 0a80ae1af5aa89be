"""An id on the command line addresses that one resource, whatever characters it holds."""

from __future__ import annotations

import os
import subprocess
import sys

import httpx


def test_a_crafted_worker_id_cannot_revoke_a_key(coordinator_process) -> None:  # type: ignore[no-untyped-def]
    with coordinator_process.admin() as admin:
        key = admin.post("/api/admin/keys", json={"name": "victim"}).json()
    env = {
        **os.environ,
        "RMA_COORDINATOR_URL": coordinator_process.url,
        "RMA_ADMIN_KEY": coordinator_process.admin_key,
    }
    for crafted in (f"../keys/{key['id']}", f"x/../../keys/{key['id']}", "a?b=c"):
        proc = subprocess.run(
            [sys.executable, "-m", "rma", "admin", "remove", crafted],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
        assert proc.returncode == 1, proc.stderr
        assert proc.stderr.startswith("error:")
    with coordinator_process.admin() as admin:
        keys = {k["id"]: k for k in admin.get("/api/admin/keys").json()}
    assert keys[key["id"]]["revoked"] is False
    r = httpx.get(
        coordinator_process.url + "/v1/models", headers={"authorization": f"Bearer {key['key']}"}
    )
    assert r.status_code == 200


def test_a_malformed_coordinator_url_is_one_error_line() -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "rma",
            "admin",
            "workers",
            "--coordinator",
            "http://[::1",
            "--admin-key",
            "x",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    assert proc.stderr.startswith("error:") and "Traceback" not in proc.stderr
