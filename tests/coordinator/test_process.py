"""The coordinator as a real process (``rma coordinator serve`` on a loopback port): crash safety,
live events, body and rate limits through uvicorn, HTTPS."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from .conftest import SERVICE_CAPS, Coordinator, make_tls_files, start_coordinator

pytestmark = pytest.mark.slow


def _register(url: str, token: str, name: str) -> dict[str, Any]:
    r = httpx.post(
        f"{url}/api/worker/register",
        json={"token": token, "name": name, "capabilities": SERVICE_CAPS, "labels": {"n": name}},
        timeout=10,
    )
    assert r.status_code == 201, r.text
    return dict(r.json())


def test_sigkill_and_restart_keeps_every_worker_token_and_key(
    tmp_path: Path, database_url: str
) -> None:
    data = tmp_path / "coord"
    coord = start_coordinator(data, database_url=database_url)
    try:
        admin_key = coord.admin_key
        with coord.admin() as admin:
            token = coord.token(uses=5)
            workers = [_register(coord.url, token, f"w{i}") for i in range(3)]
            spare = admin.post("/api/admin/tokens", json={"ttl": 3600, "label": "spare"}).json()
            key = admin.post("/api/admin/keys", json={"name": "app", "rpm": 7}).json()
            admin.post(f"/api/admin/workers/{workers[1]['worker_id']}/drain").raise_for_status()
            before = {
                "workers": admin.get("/api/admin/workers").json(),
                "tokens": admin.get("/api/admin/tokens").json(),
                "keys": admin.get("/api/admin/keys").json(),
            }
        coord.stop(signal.SIGKILL)
        assert coord.proc.returncode == -signal.SIGKILL
    finally:
        coord.stop()

    again = start_coordinator(data, database_url=database_url)
    try:
        assert again.admin_key == admin_key  # same key file, not re-made
        with again.admin() as admin:
            after = {
                "workers": admin.get("/api/admin/workers").json(),
                "tokens": admin.get("/api/admin/tokens").json(),
                "keys": admin.get("/api/admin/keys").json(),
            }
            assert after == before
            statuses = {w["name"]: w["status"] for w in after["workers"]}
            assert statuses == {"w0": "online", "w1": "draining", "w2": "online"}
            used = {t["label"]: t["used"] for t in after["tokens"]}
            assert used == {"test": 3, "spare": 0}
            # each registration also made its worker's service key (one per worker)
            mine = [k["id"] for k in after["keys"] if not k["name"].startswith("worker services ")]
            assert mine == [key["id"]]
            assert len(after["keys"]) == 1 + len(workers)
        # the workers' credentials still work (the signing key survived) ...
        r = httpx.post(
            f"{again.url}/api/worker/heartbeat",
            json={},
            headers={"authorization": f"Bearer {workers[0]['credential']}"},
            timeout=10,
        )
        assert r.status_code == 200, r.text
        # ... and a worker re-joins as itself with its id and secret
        r = httpx.post(
            f"{again.url}/api/worker/register",
            json={
                "name": "w2",
                "capabilities": SERVICE_CAPS,
                "worker_id": workers[2]["worker_id"],
                "worker_secret": workers[2]["worker_secret"],
            },
            timeout=10,
        )
        assert r.status_code == 201
        assert r.json()["worker_id"] == workers[2]["worker_id"]
        # the spare token still lets a new worker in
        _register(again.url, spare["token"], "w3")
    finally:
        again.stop()


def test_events_follow_streams_a_live_event(coordinator_process: Coordinator) -> None:
    coord = coordinator_process
    headers = {"authorization": f"Bearer {coord.admin_key}"}
    seen: list[dict[str, Any]] = []
    with (
        httpx.Client(base_url=coord.url, headers=headers, timeout=httpx.Timeout(10)) as c,
        c.stream("GET", "/api/admin/events", params={"follow": "true"}) as resp,
    ):
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        lines = resp.iter_lines()
        for line in lines:
            if line.startswith(": connected"):
                break
        # now something happens in the pool, through another connection
        token = coord.token(uses=1)
        _register(coord.url, token, "live-one")
        event = ""
        for line in lines:
            if line.startswith("event:"):
                event = line[6:].strip()
            if line.startswith("data:") and event == "joined":
                seen.append(json.loads(line[5:]))
                break
    assert seen
    assert seen[0]["kind"] == "joined"
    assert "live-one" in seen[0]["message"]


def test_chunked_body_over_the_limit_is_413_through_uvicorn(
    tmp_path: Path, database_url: str
) -> None:
    coord = start_coordinator(
        tmp_path / "coord", database_url=database_url, env={"RMA_MAX_BODY_BYTES": "4096"}
    )
    try:

        def chunks() -> Iterator[bytes]:
            for _ in range(64):
                yield b" " * 1024

        with coord.admin() as admin:
            r = admin.post(
                "/api/admin/tokens", content=chunks(), headers={"content-type": "application/json"}
            )
            assert "content-length" not in r.request.headers
            assert r.request.headers["transfer-encoding"] == "chunked"
            assert r.status_code == 413, r.text
            assert r.json()["error"]["code"] == "too_large"
            assert admin.get("/api/admin/tokens").json() == []  # nothing was created
            # the server is fine afterwards
            assert admin.post("/api/admin/tokens", json={"ttl": 60}).status_code == 201
        r = httpx.post(
            f"{coord.url}/api/worker/register",
            content=chunks(),
            headers={"content-type": "application/json"},
        )
        assert r.status_code == 413
    finally:
        coord.stop()
    log = coord.log.read_text() if coord.log else ""
    assert "Traceback" not in log, log


def test_429_with_retry_after_after_failed_admin_auths(tmp_path: Path, database_url: str) -> None:
    coord = start_coordinator(
        tmp_path / "coord", database_url=database_url, env={"RMA_AUTH_FAIL_LIMIT": "3"}
    )
    try:
        bad = {"authorization": "Bearer rma_admin_wrong"}
        codes = [
            httpx.get(f"{coord.url}/api/admin/workers", headers=bad).status_code for _ in range(4)
        ]
        assert codes == [401, 401, 401, 429]
        r = httpx.get(f"{coord.url}/api/admin/stats", headers=bad)
        assert r.status_code == 429
        assert int(r.headers["retry-after"]) > 0
        assert "too many failed authentications" in r.json()["error"]["message"]
    finally:
        coord.stop()


def test_https_with_a_private_ca(tmp_path: Path, database_url: str) -> None:
    tls = make_tls_files(tmp_path / "tls")
    coord = start_coordinator(
        tmp_path / "coord",
        database_url=database_url,
        extra_args=["--tls-cert", str(tls.cert), "--tls-key", str(tls.key)],
        scheme="https",
        verify=str(tls.ca),
    )
    try:
        assert coord.url.startswith("https://")
        env = {**os.environ, "RMA_DATA_DIR": str(coord.data_dir), "NO_COLOR": "1"}
        base = [sys.executable, "-m", "rma", "admin", "workers", "--coordinator", coord.url]
        ok = subprocess.run(
            [*base, "--ca-file", str(tls.ca), "--json"], env=env, capture_output=True, text=True,
            timeout=60,
        )  # fmt: skip
        assert ok.returncode == 0, ok.stderr
        assert json.loads(ok.stdout) == []
        # without the CA the certificate cannot be verified: a clear, one-line error
        bad = subprocess.run(base, env=env, capture_output=True, text=True, timeout=60)
        assert bad.returncode == 1
        lines = bad.stderr.strip().splitlines()
        assert len(lines) == 1, bad.stderr
        assert lines[0].startswith("error:"), bad.stderr
        assert "certificate" in lines[0]
        assert "--ca-file" in lines[0]
        assert bad.stdout == ""
        # plain HTTP to the HTTPS port is refused, not served
        with pytest.raises(httpx.HTTPError):
            httpx.get(coord.url.replace("https://", "http://") + "/api/admin/workers", timeout=5)
    finally:
        coord.stop()


def test_concurrent_registrations_cannot_overuse_a_token(
    coordinator_process: Coordinator,
) -> None:
    coord = coordinator_process
    token = coord.token(uses=3)
    results: list[int] = []

    def join(i: int) -> None:
        r = httpx.post(
            f"{coord.url}/api/worker/register",
            json={"token": token, "name": f"racer{i}", "capabilities": SERVICE_CAPS},
            timeout=30,
        )
        results.append(r.status_code)

    threads = [threading.Thread(target=join, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [201] * 3 + [401] * 5
    with coord.admin() as admin:
        assert len(admin.get("/api/admin/workers").json()) == 3


def test_behind_a_proxy_the_forwarded_address_is_rate_limited(
    tmp_path: Path, database_url: str
) -> None:
    coord = start_coordinator(
        tmp_path / "coord",
        database_url=database_url,
        extra_args=["--forwarded-allow-ips", "127.0.0.1"],
        env={"RMA_AUTH_FAIL_LIMIT": "2"},
    )
    try:
        bad = {"authorization": "Bearer rma_admin_wrong"}
        url = f"{coord.url}/api/admin/workers"
        attacker = {**bad, "x-forwarded-for": "203.0.113.5"}
        codes = [httpx.get(url, headers=attacker).status_code for _ in range(3)]
        assert codes == [401, 401, 429]
        # another client behind the same proxy is not locked out
        good = {"authorization": f"Bearer {coord.admin_key}", "x-forwarded-for": "198.51.100.9"}
        assert httpx.get(url, headers=good).status_code == 200
    finally:
        coord.stop()
