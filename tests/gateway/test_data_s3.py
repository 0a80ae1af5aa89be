"""The S3 backup store with a real coordinator and a real S3-compatible server (moto's, with
signatures checked): uploads land in the bucket (seen with boto3, not rma's code), are listed
and served from the database's index, checked against their SHA-256 on the way back; a bucket
that refuses gives a clear 503 and loses nothing; a second coordinator on the same PostgreSQL
serves the same backups.  Skips, naming moto, when ``moto[server]`` is not installed.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from test_data_connect import data_catalog
from tests.conftest import TEST_DB_URL, start_coordinator
from tests.moto_s3 import MotoS3, moto_s3

from rma.coordinator.credentials import write_secret_file

PREFIX = "rma/backups/"


@pytest.fixture
def s3(tmp_path: Path) -> Iterator[MotoS3]:
    with moto_s3(tmp_path / "moto") as server:
        yield server


def call(pool: Any, worker: str, method: str, service: str, body: bytes = b"",
         url: str | None = None, **params: str) -> httpx.Response:  # fmt: skip
    credential = pool.workers[worker][1]
    return httpx.request(
        method,
        f"{url or pool.url}/api/worker/backups/{service}",
        content=body if method == "PUT" else None,
        params=params or None,
        headers={"authorization": f"Bearer {credential}"},
        timeout=30,
    )


def bucket_keys(s3: MotoS3) -> dict[str, bytes]:
    boto = s3.boto()
    try:
        listed = boto.list_objects_v2(Bucket=s3.bucket, Prefix=PREFIX).get("Contents", [])
        return {
            o["Key"]: boto.get_object(Bucket=s3.bucket, Key=o["Key"])["Body"].read() for o in listed
        }
    finally:
        boto.close()


def listed(pool: Any) -> list[dict[str, Any]]:
    res = subprocess.run(
        [sys.executable, "-m", "rma", "admin", "backups", "--json", "--coordinator", pool.url,
         "--admin-key", pool.coord.admin_key],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    rows: list[dict[str, Any]] = json.loads(res.stdout)
    return rows


def test_backups_go_to_the_bucket(pool_factory, s3: MotoS3) -> None:
    pool = pool_factory(env=s3.env(RMA_BACKUP_KEEP="2"), catalog_text=data_catalog())
    pool.add_worker("holder", {"redis": "http://127.0.0.1:9"})

    assert call(pool, "holder", "GET", "redis").json()["error"]["code"] == "no_backup"
    r = call(pool, "holder", "PUT", "redis", b"snapshot-1")
    assert r.status_code == 201, r.text
    first = r.json()
    assert first["location"] == f"s3:{s3.bucket}" and first["size"] == 10
    assert bucket_keys(s3) == {f"{PREFIX}redis/{first['id']}.bak": b"snapshot-1"}
    assert not (pool.coord.data_dir / "backups").exists()  # nothing on the coordinator's disk

    got = call(pool, "holder", "GET", "redis")
    assert got.status_code == 200 and got.content == b"snapshot-1"
    assert got.headers["x-rma-backup-sha256"] == first["sha256"]
    assert [(b["id"], b["location"]) for b in listed(pool)] == [(first["id"], f"s3:{s3.bucket}")]

    # the bucket refuses: a clear 503 for the agent, and the backup before it is still there
    s3.refuse()
    try:
        r = call(pool, "holder", "PUT", "redis", b"snapshot-2")
        assert r.status_code == 503, r.text
        error = r.json()["error"]
        assert error["code"] == "backup_store_unavailable"
        assert "AccessDenied" in error["message"] and s3.bucket in error["message"], error
        r = call(pool, "holder", "GET", "redis")
        assert r.status_code == 503 and "AccessDenied" in r.text, r.text  # never 404: no backup
        assert [b["id"] for b in listed(pool)] == [first["id"]]
    finally:
        s3.refuse(False)
    assert call(pool, "holder", "GET", "redis").content == b"snapshot-1"

    # keep 2: the oldest object goes from the bucket as the index drops it
    ids = [first["id"]]
    for body in (b"snapshot-3", b"snapshot-four"):
        time.sleep(0.002)  # ids are milliseconds
        r = call(pool, "holder", "PUT", "redis", body)
        assert r.status_code == 201, r.text
        ids.append(r.json()["id"])
    assert [b["id"] for b in listed(pool)] == ids[:0:-1]
    assert set(bucket_keys(s3)) == {f"{PREFIX}redis/{i}.bak" for i in ids[1:]}
    assert call(pool, "holder", "GET", "redis", id=ids[1]).content == b"snapshot-3"

    # a changed object in the bucket is not handed out whole: the download breaks off
    boto = s3.boto()
    try:
        boto.put_object(Bucket=s3.bucket, Key=f"{PREFIX}redis/{ids[2]}.bak", Body=b"snapshot-FOUR")
    finally:
        boto.close()
    with pytest.raises(httpx.HTTPError):
        call(pool, "holder", "GET", "redis")

    pool.coord.stop()
    assert pool.coord.log is not None
    log = pool.coord.log.read_text()
    assert "failed its SHA-256 check" in log or "is corrupt" in log, log[-2000:]
    assert s3.secret_key not in log


def test_a_misconfigured_bucket_is_named_at_start(pool_factory, s3: MotoS3) -> None:
    pool = pool_factory(env=s3.env(RMA_BACKUP_S3_BUCKET="no-such-bucket"),
                        catalog_text=data_catalog())  # fmt: skip
    pool.add_worker("holder", {"redis": "http://127.0.0.1:9"})
    r = call(pool, "holder", "PUT", "redis", b"snapshot")
    assert r.status_code == 503, r.text
    assert "NoSuchBucket" in r.json()["error"]["message"]
    assert listed(pool) == []
    pool.coord.stop()
    assert pool.coord.log is not None
    log = pool.coord.log.read_text()
    assert "no-such-bucket" in log and "NoSuchBucket" in log, log[-2000:]


def test_the_settings_never_show_the_secret(s3: MotoS3) -> None:
    from rma.settings import CoordinatorSettings

    settings = CoordinatorSettings(
        backup_s3_url=s3.url,
        backup_s3_bucket=s3.bucket,
        backup_s3_access_key=s3.access_key,
        backup_s3_secret_key=s3.secret_key,
    )
    assert s3.secret_key not in repr(settings) and s3.secret_key not in str(settings)
    assert s3.secret_key not in settings.model_dump_json()
    with pytest.raises(ValueError, match="backup_s3_bucket"):
        CoordinatorSettings(backup_s3_url=s3.url)
    with pytest.raises(ValueError, match="backup_s3_secret_key"):
        CoordinatorSettings(backup_s3_url=s3.url, backup_s3_bucket="b", backup_s3_access_key="a")


@pytest.mark.skipif(
    not TEST_DB_URL or not TEST_DB_URL.startswith("postgres"),
    reason="several coordinators need PostgreSQL: set RMA_TEST_DATABASE_URL",
)
def test_a_second_coordinator_serves_the_backup(pool_factory, s3: MotoS3, tmp_path: Path) -> None:
    env = {**s3.env(), "RMA_COORDINATOR_NAME": "a"}
    pool = pool_factory(env=env, catalog_text=data_catalog())
    pool.add_worker("holder", {"redis": "http://127.0.0.1:9"})
    r = call(pool, "holder", "PUT", "redis", b"taken-on-a")
    assert r.status_code == 201, r.text

    write_secret_file(tmp_path / "b" / "admin.key", pool.coord.admin_key)
    b = start_coordinator(
        tmp_path / "b",
        database_url=TEST_DB_URL,
        extra_args=["--catalog", str(pool.catalog)],
        env={**s3.env(), "RMA_COORDINATOR_NAME": "b"},
    )
    try:
        with b.admin() as c:
            assert [x["id"] for x in c.get("/api/admin/backups").json()] == [r.json()["id"]]
        deadline = time.monotonic() + 30  # b's registry follows a's: the assignment arrives
        while True:
            got = call(pool, "holder", "GET", "redis", url=b.url)
            if got.status_code == 200 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert got.status_code == 200 and got.content == b"taken-on-a", got.text
    finally:
        b.stop()
