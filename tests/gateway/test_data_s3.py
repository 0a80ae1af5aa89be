"""The S3 backup store with a real coordinator and a real S3-compatible server (moto's, with
signatures checked): uploads land in the bucket (seen with boto3, not rma's code), are listed
and served from the database's index, checked against their SHA-256 on the way back; a bucket
that refuses gives a clear 503 and loses nothing; a second coordinator on the same PostgreSQL
serves the same backups.  Skips, naming moto, when ``moto[server]`` is not installed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from test_agents import kill_machine
from test_data_connect import Connect, data_catalog, data_key, need, start_agent, wait_for
from test_data_durability import _online, backed_up_after, holder
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
        state = httpx.get(pool.url + "/readyz", timeout=10).json()["backup_store"]
        assert state.startswith("failing: ") and "AccessDenied" in state, state
    finally:
        s3.refuse(False)
    assert call(pool, "holder", "GET", "redis").content == b"snapshot-1"
    assert httpx.get(pool.url + "/readyz", timeout=10).json()["backup_store"] == "ok"

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
    assert [b["id"] for b in listed(pool)] == [ids[1]]  # it left the list; its object stays
    assert call(pool, "holder", "GET", "redis").content == b"snapshot-3"  # the one before

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
    ready = httpx.get(pool.url + "/readyz", timeout=10)
    assert ready.status_code == 200 and "NoSuchBucket" in ready.json()["backup_store"]
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
    with pytest.raises(ValueError, match="endpoint only"):
        CoordinatorSettings(backup_s3_url=f"{s3.url}/{s3.bucket}", backup_s3_bucket="bkt")
    with pytest.raises(ValueError, match="backup_s3_secret_key"):
        CoordinatorSettings(backup_s3_url=s3.url, backup_s3_bucket="bkt", backup_s3_access_key="a")
    with pytest.raises(ValueError, match="not a bucket name") as bad:  # no input repeated
        CoordinatorSettings(
            backup_s3_url=s3.url,
            backup_s3_bucket="b/x",
            backup_s3_access_key="a",
            backup_s3_secret_key=s3.secret_key,
        )
    assert s3.secret_key not in str(bad.value)  # (pydantic would show the input: a secret)

    res = subprocess.run(  # rma coordinator serve: one error line, no secret, no traceback
        [sys.executable, "-m", "rma", "coordinator", "serve", "--port", "0"],
        env={**os.environ, **s3.env(RMA_BACKUP_S3_BUCKET="b/x")},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert res.returncode != 0
    assert res.stderr.startswith("error: invalid settings: backup_s3_bucket"), res.stderr
    assert "Traceback" not in res.stderr and s3.secret_key not in res.stderr + res.stdout


@pytest.mark.skipif(
    not TEST_DB_URL or not TEST_DB_URL.startswith("postgres"),
    reason="several coordinators need PostgreSQL: set RMA_TEST_DATABASE_URL",
)
@pytest.mark.parametrize("store", ["s3", "data-dir"])
def test_a_second_coordinator_serves_the_backup(
    pool_factory, s3: MotoS3, tmp_path: Path, store: str
) -> None:
    """With S3, coordinator b serves what a received; with the data-dir store, b says where the
    backup is (503), never "none" (the new holder would start empty)."""
    stored = s3.env() if store == "s3" else {}
    pool = pool_factory(env={**stored, "RMA_COORDINATOR_NAME": "a"}, catalog_text=data_catalog())
    pool.add_worker("holder", {"redis": "http://127.0.0.1:9"})
    r = call(pool, "holder", "PUT", "redis", b"taken-on-a")
    assert r.status_code == 201, r.text

    write_secret_file(tmp_path / "b" / "admin.key", pool.coord.admin_key)
    b = start_coordinator(
        tmp_path / "b",
        database_url=TEST_DB_URL,
        extra_args=["--catalog", str(pool.catalog)],
        env={**stored, "RMA_COORDINATOR_NAME": "b"},
    )
    try:
        with b.admin() as c:
            assert [x["id"] for x in c.get("/api/admin/backups").json()] == [r.json()["id"]]
        deadline = time.monotonic() + 30  # b's registry follows a's: the assignment arrives
        while True:
            got = call(pool, "holder", "GET", "redis", url=b.url)
            if got.status_code != 403 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        if store == "s3":
            assert got.status_code == 200 and got.content == b"taken-on-a", got.text
        else:
            assert got.status_code == 503, got.text
            message = got.json()["error"]["message"]
            assert "coordinator 'a'" in message and "backup_s3_url" in message, message
    finally:
        b.stop()


@pytest.mark.slow
def test_a_data_worker_backs_up_to_the_bucket_and_the_next_restores(
    pool_factory, s3: MotoS3, tmp_path: Path
) -> None:
    """Real data workers: data-a's PostgreSQL and Redis backups land in the bucket; data-a
    dies; data-b restores both from the bucket before it reports them healthy."""
    need("initdb")
    need("redis-server")
    import psycopg
    import redis

    env = {"RMA_HEARTBEAT_INTERVAL": "1", "RMA_OFFLINE_AFTER": "4", "RMA_SWEEP_INTERVAL": "1"}
    pool = pool_factory(env={**env, **s3.env()}, catalog_text=data_catalog())
    key = data_key(pool, "postgres", "redis")
    agent_env = {"RMA_BACKUP_INTERVAL": "2"}
    agents = {"data-a": start_agent(pool, tmp_path, "data-a", env=agent_env)}
    connects: list[Connect] = []
    logs = [tmp_path / "data-a.log", tmp_path / "data-b.log"]
    try:
        wait_for("postgres and redis on data-a", lambda: holder(pool, "postgres") == "data-a"
                 and holder(pool, "redis") == "data-a", 120, logs)  # fmt: skip
        pg, rd = Connect(pool, "postgres", key, tmp_path), Connect(pool, "redis", key, tmp_path)
        connects += [pg, rd]
        with psycopg.connect(pg.url, connect_timeout=20) as conn:
            conn.execute("CREATE TABLE notes (id int PRIMARY KEY)")
            conn.execute("INSERT INTO notes SELECT generate_series(0, 199)")
        r = redis.Redis.from_url(rd.url, socket_timeout=20)
        try:
            r.mset({f"k{i}": f"v{i}" for i in range(200)})
        finally:
            r.close()
        written = time.time()
        wait_for("a backup of both after the writes", lambda: backed_up_after(pool, "postgres",
                 written) and backed_up_after(pool, "redis", written), 60, logs)  # fmt: skip

        rows = listed(pool)  # rma admin backups: every one in the bucket, as big as listed
        in_bucket = bucket_keys(s3)
        assert rows and all(b["location"] == f"s3:{s3.bucket}" for b in rows)
        for b in rows:
            data = in_bucket.get(f"{PREFIX}{b['service']}/{b['id']}.bak")
            assert data is not None and len(data) == b["size"], b
        assert not (pool.coord.data_dir / "backups").exists()

        agents["data-b"] = start_agent(pool, tmp_path, "data-b", env=agent_env)
        wait_for("data-b online", lambda: _online(pool, "data-b"), 60, logs)
        kill_machine(agents["data-a"])
        wait_for("postgres and redis restored on data-b", lambda: holder(pool, "postgres")
                 == "data-b" and holder(pool, "redis") == "data-b", 120, logs)  # fmt: skip

        with psycopg.connect(pg.url, connect_timeout=20) as conn:
            assert conn.execute("SELECT count(*) FROM notes").fetchone() == (200,)
        r = redis.Redis.from_url(rd.url, socket_timeout=20)
        try:
            assert r.mget([f"k{i}" for i in range(200)]) == [f"v{i}".encode() for i in range(200)]
        finally:
            r.close()
    finally:
        for conn_proc in connects:
            conn_proc.stop()
        for proc in agents.values():
            if proc.poll() is None:
                kill_machine(proc)
