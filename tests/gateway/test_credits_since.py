"""``rma admin credits --since``: the ledger of a time window, with a real coordinator.

Two workers of two owners serve real requests in two batches; the window from between the
batches holds only the second one, and its sums per worker, owner and key still add up.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest
from tests.gateway.conftest import Backend, Pool
from typer.testing import CliRunner


def _wait(cond: Callable[[], bool], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _credits(pool: Pool, by: str, since: str | None = None) -> list[dict[str, Any]]:
    params = {"by": by} if since is None else {"by": by, "since": since}
    with pool.coord.admin() as c:
        r = c.get("/api/admin/credits", params=params)
        assert r.status_code == 200, r.text
        return list(r.json())


def _requests(rows: list[dict[str, Any]]) -> int:
    return sum(int(r["requests"]) for r in rows)


def _serve(pool: Pool, n: int) -> None:
    body = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}
    with pool.client() as c:
        for _ in range(n):
            r = c.post("/v1/chat/completions", json=body)
            assert r.status_code == 200, r.text


def _assert_adds_up(pool: Pool, since: str | None, served: int) -> None:
    """Per worker, per owner and per key: the same requests and the same credits."""
    workers, owners, keys = (_credits(pool, by, since) for by in ("worker", "owner", "key"))
    assert _requests(workers) == _requests(owners) == _requests(keys) == served
    earned = sum(r["credits"] for r in workers)
    assert earned > 0
    assert sum(r["credits"] for r in owners) == pytest.approx(earned)
    # no escrow here (RMA_CREDIT_ESCROW_RESULTS=0): every credit earned is a key's debit
    assert sum(r["credits"] for r in keys) == pytest.approx(-earned)
    assert all(r["escrow"] == 0 for r in workers + owners)


def test_since_leaves_out_older_entries_and_the_window_adds_up(
    pool_factory: Callable[..., Pool], backends: Callable[..., Backend]
) -> None:
    from rma.cli.main import app

    pool = pool_factory(env={"RMA_CREDIT_ESCROW_RESULTS": "0"})
    for name, owner in (("w-alice", "alice"), ("w-bob", "bob")):
        pool.add_worker(name, {"fake": backends(name).url}, owner=owner)

    _serve(pool, 6)  # the first batch, then (once it is written) the window's start
    _wait(lambda: _requests(_credits(pool, "key")) == 6, "the first batch credited")
    # a duration is counted back from the coordinator's clock: the batch leaves a 1 s window
    _wait(lambda: _credits(pool, "worker", "1s") == [], "the first batch older than 1s")
    assert _requests(_credits(pool, "worker", "24h")) == 6
    start = datetime.now(UTC)
    _serve(pool, 4)
    _wait(lambda: _requests(_credits(pool, "key")) == 10, "the second batch credited")

    _assert_adds_up(pool, None, 10)
    _assert_adds_up(pool, start.isoformat(), 4)
    _assert_adds_up(pool, "7d", 10)
    # a zone-less timestamp is UTC
    naive = start.replace(tzinfo=None).isoformat()
    assert _requests(_credits(pool, "key", naive)) == 4
    all_time = {r["id"]: r for r in _credits(pool, "worker")}
    for row in _credits(pool, "worker", start.isoformat()):
        assert row["requests"] <= all_time[row["id"]]["requests"]
        assert row["credits"] < all_time[row["id"]]["credits"] or row["requests"] == 0
    later = datetime.fromtimestamp(time.time() + 3600, UTC).isoformat()
    assert _credits(pool, "owner", later) == []

    env = {"RMA_COORDINATOR_URL": pool.url, "RMA_ADMIN_KEY": pool.coord.admin_key}
    runner = CliRunner()
    stamp = start.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    r = runner.invoke(app, ["admin", "credits", "--by", "owner", "--since", stamp, "--json"],
                      env=env)  # fmt: skip
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)
    assert {row["name"] for row in rows} <= {"alice", "bob"}
    assert _requests(rows) == 4
    r = runner.invoke(app, ["admin", "credits", "--since", "24h"], env=env)
    assert r.exit_code == 0, r.output
    assert "w-alice" in r.stdout or "w-bob" in r.stdout


@pytest.mark.parametrize("since", ["yesterday", "0m", "-5m", "12x", "2026-13-01", "", "9" * 80])
def test_a_bad_since_is_refused_with_a_clear_error(pool: Pool, since: str) -> None:
    from rma.cli.main import app

    with pool.coord.admin() as c:
        r = c.get("/api/admin/credits", params={"since": since})
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] == "invalid_since"
    assert "since" in r.json()["error"]["message"]

    env = {"RMA_COORDINATOR_URL": pool.url, "RMA_ADMIN_KEY": pool.coord.admin_key}
    r2 = CliRunner().invoke(app, ["admin", "credits", "--since", since], env=env)
    assert r2.exit_code == 2
    assert r2.stdout == ""
    lines = r2.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --since:"), r2.stderr
    r3 = CliRunner().invoke(app, ["admin", "credits", "--since", since, "--json"], env=env)
    assert r3.exit_code == 2
    assert json.loads(r3.stdout)["error"]["code"] == "invalid_since"
