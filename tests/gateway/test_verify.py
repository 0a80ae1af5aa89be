"""Verification, reputation, quarantine and quorum with real coordinators and real backends.

Five workers serve one verifiable service (fake backends over real sockets); one of them lies
(``--lie``: random vectors for embeddings, wrong labels for NER).  The coordinator re-runs
answers on other workers, finds the liar and quarantines it; with ``x-rma-verify: quorum`` no
wrong answer reaches the client.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from tests.gateway.conftest import FAKE_BACKEND, Backend, Pool
from typer.testing import CliRunner

CATALOG = f"""
[services.emb]
description = "fake embeddings, verified by cosine similarity"
tier = 3
kind = "openai"
models = ["fake-embed"]
task = "embeddings"
command = ["{{python}}", "{FAKE_BACKEND}", "--port", "{{port}}"]
health = "/health"
replicas = 16
verify = "cosine:0.99"

[services.entities]
description = "fake NER, verified by equal JSON"
tier = 3
kind = "http"
command = ["{{python}}", "{FAKE_BACKEND}", "--port", "{{port}}"]
health = "/health"
replicas = 16
verify = "json"
"""

DIM = "16"
#: The quorum's promise: not one wrong answer over this many requests, from this many clients.
QUORUM_REQUESTS = 500
QUORUM_CLIENTS = 8
HONEST_VECTOR = [(i % 17) / 17 for i in range(int(DIM))]
TEXT = "Alice met Bob at Acme in Paris"


def _cos(x: list[float], y: list[float]) -> float:
    dot = sum(a * b for a, b in zip(x, y, strict=True))
    return dot / (math.sqrt(sum(a * a for a in x)) * math.sqrt(sum(b * b for b in y)))


def _posts(b: Backend) -> int:
    return int(httpx.get(b.url + "/health", timeout=5).json()["posts"])


def _workers(pool: Pool) -> dict[str, dict[str, Any]]:
    with pool.coord.admin() as c:
        r = c.get("/api/admin/workers")
        r.raise_for_status()
        return {w["name"]: w for w in r.json()}


def _wait(cond: Callable[[], bool], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


class Kind:
    """How to call one verifiable service and tell a right answer from a wrong one."""

    def __init__(self, service: str) -> None:
        self.service = service

    @contextmanager
    def client(self, pool: Pool) -> Iterator[Any]:
        """The client a caller keeps for many calls (its connections are reused)."""
        if self.service == "emb":
            sdk = openai.OpenAI(
                base_url=pool.url + "/v1", api_key=pool.api_key, max_retries=0, timeout=30
            )
            try:
                yield sdk
            finally:
                sdk.close()
        else:
            with pool.client() as http:
                yield http

    def call(
        self, pool: Pool, headers: dict[str, str] | None = None, client: Any = None
    ) -> tuple[int, str, bool]:
        """(status, worker name, answer right); a fresh client for this call unless given."""
        if client is None:
            with self.client(pool) as fresh:
                return self.call(pool, headers, fresh)
        if self.service == "emb":
            try:
                raw = client.embeddings.with_raw_response.create(
                    model="fake-embed", input="hello", extra_headers=headers or {}
                )
            except openai.APIStatusError as exc:
                return exc.status_code, "", False
            vec = raw.parse().data[0].embedding
            return raw.status_code, raw.headers["x-rma-worker"], _cos(vec, HONEST_VECTOR) > 0.999
        r = client.post("/api/services/entities/ner", json={"text": TEXT}, headers=headers or {})
        if r.status_code != 200:
            return r.status_code, "", False
        labels = {e["label"] for e in r.json()["entities"]}
        return 200, r.headers["x-rma-worker"], labels == {"ORG"}


KINDS = [pytest.param(Kind("emb"), id="embeddings"), pytest.param(Kind("entities"), id="ner")]


def _pool_of_five(
    pool_factory: Callable[..., Pool], backends: Callable[..., Backend], env: dict[str, str]
) -> tuple[Pool, dict[str, Backend]]:
    pool = pool_factory(env=env, catalog_text=CATALOG)
    started: dict[str, Backend] = {}
    for name in ("honest1", "honest2", "honest3", "honest4", "liar"):
        args = ["--dim", DIM] + (["--lie"] if name == "liar" else [])
        b = backends(name, *args)
        started[name] = b
        pool.add_worker(name, {"emb": b.url, "entities": b.url})
    return pool, started


@pytest.mark.parametrize("kind", KINDS)
def test_a_lying_worker_is_quarantined_and_then_gets_no_traffic(
    pool_factory: Callable[..., Pool], backends: Callable[..., Backend], kind: Kind
) -> None:
    pool, started = _pool_of_five(pool_factory, backends, {})
    liar_id = pool.workers["liar"][0]

    def quarantined() -> bool:
        return bool(_workers(pool)["liar"]["quarantined"])

    deadline = time.monotonic() + 120
    while not quarantined():
        assert time.monotonic() < deadline, "the liar was never quarantined"
        status, _, _ = kind.call(pool)
        assert status == 200  # verification is off the client's path: every call is answered
    liar = _workers(pool)["liar"]
    assert liar["verified"] <= 20, liar
    assert liar["disagreements"] >= 1
    assert liar["reputation"] < 0.3

    with pool.coord.admin() as c:
        events = c.get("/api/admin/events").json()
    q = [e for e in events if e["kind"] == "quarantined" and e["worker_id"] == liar_id]
    assert q, events
    assert q[0]["data"]["service"] == kind.service
    assert q[0]["data"]["against"].startswith("honest")
    assert q[0]["data"]["disagreements"] >= 1

    # after that, no client request reaches it (nor any re-run), and every answer is right
    seen = [_posts(started["liar"])]

    def settled() -> bool:  # a re-run sent just before the quarantine may still be answered
        time.sleep(0.3)
        seen.append(_posts(started["liar"]))
        return seen[-1] == seen[-2]

    _wait(settled, "the liar's last re-run")
    before = seen[-1]
    for _ in range(40):
        status, worker, right = kind.call(pool)
        assert (status, right) == (200, True)
        assert worker != "liar"
    assert _posts(started["liar"]) == before

    # the honest workers' reputations stay up (verification goes on at their rate)
    ws = _workers(pool)
    for name in ("honest1", "honest2", "honest3", "honest4"):
        w = ws[name]
        assert w["disagreements"] == 0, w
        assert not w["quarantined"]
        assert w["reputation"] > 0.5, w
    assert ws["liar"]["status"] == "online"  # still heartbeating, still in the pool


@pytest.mark.parametrize("kind", KINDS)
def test_quorum_lets_no_wrong_answer_through(
    pool_factory: Callable[..., Pool], backends: Callable[..., Backend], kind: Kind
) -> None:
    # no background verification and no quarantine: only the quorum stands between the liar
    # and the client
    env = {
        "RMA_VERIFY_RATE_NEW": "0",
        "RMA_VERIFY_RATE_FLOOR": "0",
        "RMA_QUARANTINE_THRESHOLD": "0",
    }
    pool, started = _pool_of_five(pool_factory, backends, env)

    def client_calls(n: int) -> list[tuple[int, str, bool]]:
        with kind.client(pool) as client:  # one SDK client (connection pool) per caller
            return [kind.call(pool, {"x-rma-verify": "quorum"}, client) for _ in range(n)]

    # QUORUM_REQUESTS requests from QUORUM_CLIENTS concurrent clients
    share, rest = divmod(QUORUM_REQUESTS, QUORUM_CLIENTS)
    batches = [share + (i < rest) for i in range(QUORUM_CLIENTS)]
    with ThreadPoolExecutor(QUORUM_CLIENTS) as clients:
        answers = [a for batch in clients.map(client_calls, batches) for a in batch]
    assert len(answers) == QUORUM_REQUESTS
    wrong = [a for a in answers if a[:1] != (200,) or not a[2] or a[1] == "liar"]
    assert wrong == []  # not one wrong answer, nor one from the liar, reached a client
    assert _posts(started["liar"]) > 0  # the liar was asked, and outvoted
    ws = _workers(pool)
    assert ws["liar"]["disagreements"] > 0
    assert not ws["liar"]["quarantined"]
    assert all(ws[f"honest{i}"]["disagreements"] == 0 for i in range(1, 5))


def test_quorum_without_agreement_is_a_502(
    pool_factory: Callable[..., Pool], backends: Callable[..., Backend]
) -> None:
    pool = pool_factory(env={"RMA_QUARANTINE_THRESHOLD": "0"}, catalog_text=CATALOG)
    honest, liar = backends("honest", "--dim", DIM), backends("liar", "--dim", DIM, "--lie")
    pool.add_worker("honest", {"emb": honest.url, "entities": honest.url})
    pool.add_worker("liar", {"emb": liar.url, "entities": liar.url})
    with pool.client() as c:
        body = {"model": "fake-embed", "input": "x"}
        r = c.post("/v1/embeddings", json=body, headers={"x-rma-verify": "quorum"})
        assert r.status_code == 502, r.text
        assert r.json()["error"]["code"] == "verification_failed"
        r = c.post("/v1/embeddings", json=body, headers={"x-rma-verify": "maybe"})
        assert r.status_code == 400
        assert r.json()["error"]["code"] == "invalid_header"
        r = c.post("/v1/embeddings", json={"model": "fake-embed", "input": "x", "stream": True},
                   headers={"x-rma-verify": "quorum"})  # fmt: skip
        assert r.status_code == 400
        assert r.json()["error"]["code"] == "quorum_stream"
        # the request's own error is passed through, not called a disagreement
        r = c.post("/api/services/entities/nowhere", json={}, headers={"x-rma-verify": "quorum"})
        assert r.status_code == 404
        with pool.coord.admin() as a:
            kinds = [e["kind"] for e in a.get("/api/admin/events").json()]
        assert "verification_failed" in kinds


def test_admin_quarantine_and_unquarantine_from_the_cli(
    pool_factory: Callable[..., Pool], backends: Callable[..., Backend], tmp_path: Path
) -> None:
    from rma.cli.main import app

    pool = pool_factory(catalog_text=CATALOG)
    b = backends("only", "--dim", DIM)
    wid = pool.add_worker("only", {"emb": b.url})
    env = {"RMA_COORDINATOR_URL": pool.url, "RMA_ADMIN_KEY": pool.coord.admin_key}
    runner = CliRunner()
    r = runner.invoke(app, ["admin", "quarantine", wid, "--json"], env=env)
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["quarantined"] is True
    with pool.client() as c:
        r2 = c.post("/v1/embeddings", json={"model": "fake-embed", "input": "x"})
        assert r2.status_code == 503  # the only worker is quarantined: no client traffic
    r = runner.invoke(app, ["admin", "workers", "--json"], env=env)
    (w,) = json.loads(r.stdout)
    assert {"reputation", "quarantined", "verified", "disagreements"} <= set(w)
    r = runner.invoke(app, ["admin", "unquarantine", wid], env=env)
    assert r.exit_code == 0, r.output
    with pool.client() as c:
        r2 = c.post("/v1/embeddings", json={"model": "fake-embed", "input": "x"})
        assert r2.status_code == 200
    with pool.coord.admin() as a:
        kinds = [e["kind"] for e in a.get("/api/admin/events").json()]
    assert "quarantined" in kinds
    assert "unquarantined" in kinds
    r = runner.invoke(app, ["admin", "quarantine", "nope"], env=env)
    assert r.exit_code == 1
    assert "error:" in r.stderr


def test_credits_add_up_escrow_is_released_and_the_liars_is_forfeited(
    pool_factory: Callable[..., Pool], backends: Callable[..., Backend]
) -> None:
    from rma.cli.main import app

    pool, _ = _pool_of_five(pool_factory, backends, {"RMA_CREDIT_ESCROW_RESULTS": "3"})
    kind = Kind("emb")
    sent = 0
    liar_served = 0  # client requests the liar answered (it may be caught as a re-runner first)
    deadline = time.monotonic() + 120
    while not _workers(pool)["liar"]["quarantined"]:
        assert time.monotonic() < deadline, "the liar was never quarantined"
        status, name, _ = kind.call(pool)
        assert status == 200
        sent += 1
        liar_served += name == "liar"
    for _ in range(30):
        status, name, _ = kind.call(pool)
        assert status == 200 and name != "liar"
        sent += 1

    def credits(by: str) -> list[dict[str, Any]]:
        with pool.coord.admin() as c:
            r = c.get("/api/admin/credits", params={"by": by})
            assert r.status_code == 200, r.text
            return list(r.json())

    # the last request is accounted just after its answer went out
    _wait(lambda: sum(r["requests"] for r in credits("key")) == sent, "every request credited")
    by_worker = {r["name"]: r for r in credits("worker")}
    assert sum(r["requests"] for r in by_worker.values()) == sent
    if liar_served:
        liar = by_worker["liar"]
        assert liar["requests"] == liar_served
        assert (liar["credits"], liar["escrow"]) == (0.0, 0.0)  # never established: forfeited
    else:  # caught while re-running others' requests: it served, and earned, nothing
        assert by_worker.get("liar", {"requests": 0})["requests"] == 0
    honest = [by_worker[n] for n in by_worker if n != "liar"]
    assert any(r["credits"] > 0 for r in honest)  # established: escrow released
    (key,) = credits("key")
    assert key["credits"] < 0  # the key that asked is debited
    (owner,) = credits("owner")
    assert owner["requests"] == sent

    env = {"RMA_COORDINATOR_URL": pool.url, "RMA_ADMIN_KEY": pool.coord.admin_key}
    r = CliRunner().invoke(app, ["admin", "credits", "--by", "worker", "--json"], env=env)
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)
    assert {"id", "name", "owner", "credits", "escrow", "requests"} <= set(rows[0])
    r = CliRunner().invoke(app, ["admin", "credits", "--by", "nobody"], env=env)
    assert r.exit_code == 2
