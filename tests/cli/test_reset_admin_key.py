"""``rma coordinator reset-admin-key``: a lost admin.key is not the end of the pool."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
from tests.conftest import start_coordinator


def test_reset_admin_key_replaces_the_key_of_a_running_coordinator(
    tmp_path: Path, database_url: str
) -> None:
    data = tmp_path / "coord"
    coord = start_coordinator(
        data, database_url=database_url, env={"RMA_KEY_REFRESH_INTERVAL": "0.5"}
    )
    try:
        old = coord.admin_key
        (data / "admin.key").unlink()  # the operator lost it
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "rma",
                "coordinator",
                "reset-admin-key",
                "--data-dir",
                str(data),
                "--database-url",
                database_url,
            ],
            capture_output=True,
            text=True,
            timeout=60,
            env=os.environ,
        )
        assert proc.returncode == 0, proc.stderr
        assert "new admin key written" in proc.stderr
        new = (data / "admin.key").read_text().strip()
        assert new != old
        assert new not in proc.stdout + proc.stderr  # the secret only goes to the 0600 file
        assert (data / "admin.key").stat().st_mode & 0o777 == 0o600

        def status(key: str) -> int:
            r = httpx.get(
                coord.url + "/api/admin/workers", headers={"authorization": f"Bearer {key}"}
            )
            return r.status_code

        deadline = time.monotonic() + 10
        while status(new) != 200:
            assert time.monotonic() < deadline, "the running coordinator never took the new key"
            time.sleep(0.2)
        assert status(old) == 401
    finally:
        coord.stop()


def test_reset_admin_key_with_a_bad_database_is_one_error_line(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "rma",
            "coordinator",
            "reset-admin-key",
            "--data-dir",
            str(tmp_path),
            "--database-url",
            "postgresql+psycopg://nobody@127.0.0.1:1/x",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot open the database")
    assert not (tmp_path / "admin.key").exists()
