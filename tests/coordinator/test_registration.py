"""Join tokens and ``POST /api/worker/register``: tiers, assignments, re-join, refusals."""

from __future__ import annotations

from typing import Any

import pytest

from rma.coordinator.clock import FakeClock

from .conftest import DATA_CAPS, GPU_CAPS, SERVICE_CAPS, TINY_CAPS, Api


def test_first_registration_gets_id_tier_credential_secret_and_assignments(api: Api) -> None:
    w = api.register("alpha", SERVICE_CAPS, labels={"zone": "home"}, version="0.1.0")
    body = w.body
    assert body["tier"] == 2
    assert body["tier_name"] == "service"
    assert body["credential"].count(".") == 2
    assert body["worker_secret"].startswith("rma_worker_")
    assert body["heartbeat_interval"] == 30.0
    names = [s["name"] for s in body["assignments"]]
    assert "llm" in names  # a tier-2 service that fits 8 GB
    assert "vllm" not in names  # tier 1 needs a GPU
    listed = api.worker(w.id)
    assert listed["status"] == "online"
    assert listed["labels"] == {"zone": "home"}
    assert listed["assignments"] == names
    assert [e["worker_id"] for e in api.events("joined")] == [w.id]


@pytest.mark.parametrize(
    ("caps", "tier", "tier_name"),
    [(GPU_CAPS, 1, "gpu"), (SERVICE_CAPS, 2, "service"), (DATA_CAPS, 3, "data")],
)
def test_capabilities_decide_the_tier(
    api: Api, caps: dict[str, Any], tier: int, tier_name: str
) -> None:
    w = api.register("m", caps)
    assert (w.body["tier"], w.body["tier_name"]) == (tier, tier_name)
    tiers = {s["tier"] for s in w.body["assignments"]}
    assert tiers
    assert min(tiers) >= tier


def test_too_small_machine_is_refused_with_the_reason_and_keeps_the_token(api: Api) -> None:
    token = api.token(uses=1)
    r = api.register("tiny", TINY_CAPS, token=token, expect=422)
    err = r.json()["error"]
    assert err["code"] == "tier_refused"
    assert "1024 MB" in err["message"]
    assert "2048 MB" in err["message"]
    assert api.workers() == []
    # the refusal changed nothing: the single-use token still works
    api.register("big", SERVICE_CAPS, token=token)


def test_tier_thresholds_are_settings(tmp_path: Any, database_url: str, clock: FakeClock) -> None:
    from fastapi.testclient import TestClient

    from rma.coordinator.app import create_app
    from rma.settings import CoordinatorSettings

    settings = CoordinatorSettings(
        data_dir=tmp_path / "d2", database_url=database_url, data_min_memory_mb=512
    )
    app = create_app(settings, clock=clock, run_sweeper=False)
    with TestClient(app) as client:
        api = Api(client, app, (settings.data_dir / "admin.key").read_text().strip())
        assert api.register("tiny", TINY_CAPS).body["tier"] == 3
    app.state.pool.engine.dispose()


@pytest.mark.parametrize("case", ["expired", "used", "revoked", "unknown", "garbage", "missing"])
def test_bad_join_tokens_are_refused_with_401_and_a_reason(
    api: Api, clock: FakeClock, case: str
) -> None:
    token = api.token(uses=1, ttl=60)
    if case == "expired":
        clock.advance(61)
    elif case == "used":
        api.register("first", token=token)
    elif case == "revoked":
        token_id = token.removeprefix("rma_join_").split(".")[0]
        r = api.client.delete(f"/api/admin/tokens/{token_id}", headers=api.admin)
        assert r.status_code == 200
        assert r.json()["status"] == "revoked"
    elif case == "unknown":
        token = token[:-4] + "AAAA"
    elif case == "garbage":
        token = "hello"
    before = api.workers()
    body: dict[str, Any] = {"name": "second", "capabilities": SERVICE_CAPS}
    if case != "missing":
        body["token"] = token
    r = api.client.post("/api/worker/register", json=body)
    assert r.status_code == 401, r.text
    err = r.json()["error"]
    expected = {
        "expired": ("token_expired", "expired"),
        "used": ("token_used", "used up"),
        "revoked": ("token_revoked", "revoked"),
        "unknown": ("invalid_token", "unknown"),
        "garbage": ("invalid_token", "unknown"),
        "missing": ("invalid_token", "required"),
    }[case]
    assert err["code"] == expected[0]
    assert expected[1] in err["message"]
    assert api.workers() == before


def test_token_use_count_is_enforced_and_listed(api: Api) -> None:
    token = api.token(uses=2, label="for bob")
    api.register("a", token=token)
    api.register("b", token=token)
    api.register("c", token=token, expect=401)
    tokens = api.client.get("/api/admin/tokens", headers=api.admin).json()
    mine = next(t for t in tokens if t["label"] == "for bob")
    assert (mine["used"], mine["uses"], mine["status"]) == (2, 2, "used")
    assert "token" not in mine


def test_unlimited_token(api: Api) -> None:
    token = api.token(uses=None)
    for i in range(4):
        api.register(f"w{i}", token=token)
    assert len(api.workers()) == 4


def test_rejoin_with_worker_id_and_secret_gets_the_old_record(api: Api, clock: FakeClock) -> None:
    token = api.token(uses=1)
    w = api.register("alpha", token=token)
    clock.advance(10)
    body = {
        "name": "alpha-renamed",
        "capabilities": SERVICE_CAPS,
        "worker_id": w.id,
        "worker_secret": w.secret,
    }
    r = api.client.post("/api/worker/register", json=body)  # no token needed, the used one is spent
    assert r.status_code == 201, r.text
    assert r.json()["worker_id"] == w.id
    assert r.json()["worker_secret"] is None  # the secret is given once
    workers = api.workers()
    assert [x["id"] for x in workers] == [w.id]
    assert workers[0]["name"] == "alpha-renamed"
    assert [e["worker_id"] for e in api.events("rejoined")] == [w.id]


def test_rejoin_after_leave_and_after_offline(api: Api) -> None:
    w = api.register("alpha")
    r = api.client.post("/api/worker/leave", headers=w.headers)
    assert r.status_code == 204
    assert api.worker(w.id)["status"] == "left"
    body = {
        "name": "alpha",
        "capabilities": SERVICE_CAPS,
        "worker_id": w.id,
        "worker_secret": w.secret,
    }
    r = api.client.post("/api/worker/register", json=body)
    assert r.status_code == 201
    assert r.json()["worker_id"] == w.id
    assert api.worker(w.id)["status"] == "online"


def test_rejoin_with_a_wrong_secret_is_refused_and_creates_nothing(api: Api) -> None:
    w = api.register("alpha")
    for secret in ("rma_worker_wrong", None):
        body: dict[str, Any] = {
            "name": "impostor",
            "capabilities": SERVICE_CAPS,
            "worker_id": w.id,
            "token": api.token(),
        }
        if secret:
            body["worker_secret"] = secret
        r = api.client.post("/api/worker/register", json=body)
        assert r.status_code == 401, r.text
        assert r.json()["error"]["code"] == "invalid_worker_secret"
    workers = api.workers()
    assert [(x["id"], x["name"]) for x in workers] == [(w.id, "alpha")]


def test_unknown_worker_id_with_a_token_joins_as_new(api: Api) -> None:
    body = {
        "name": "from-another-pool",
        "capabilities": SERVICE_CAPS,
        "worker_id": "0123456789abcdef",
        "worker_secret": "rma_worker_whatever",
        "token": api.token(),
    }
    r = api.client.post("/api/worker/register", json=body)
    assert r.status_code == 201, r.text
    assert r.json()["worker_id"] != "0123456789abcdef"
    assert r.json()["worker_secret"]


def test_removed_worker_cannot_rejoin_without_a_new_token(api: Api) -> None:
    w = api.register("alpha")
    assert api.client.delete(f"/api/admin/workers/{w.id}", headers=api.admin).status_code == 200
    body: dict[str, Any] = {
        "name": "alpha",
        "capabilities": SERVICE_CAPS,
        "worker_id": w.id,
        "worker_secret": w.secret,
    }
    r = api.client.post("/api/worker/register", json=body)
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "removed"
    assert api.worker(w.id)["status"] == "removed"
    # the operator hands out a new token: the same machine comes back as the same record
    r = api.client.post("/api/worker/register", json={**body, "token": api.token()})
    assert r.status_code == 201, r.text
    assert r.json()["worker_id"] == w.id
    assert [x["id"] for x in api.workers()] == [w.id]
    assert api.worker(w.id)["status"] == "online"


@pytest.mark.parametrize(
    "patch",
    [
        {"name": ""},
        {"name": "has spaces"},
        {"capabilities": {"cpu_cores": 0, "memory_mb": 4096}},
        {"capabilities": {"memory_mb": 4096}},
        {"transport": "carrier-pigeon"},
        {"unexpected": 1},
        {"labels": "not-a-dict"},
    ],
)
def test_invalid_registration_bodies_are_422_json_and_change_nothing(
    api: Api, patch: dict[str, Any]
) -> None:
    token = api.token(uses=1)
    body = {"token": token, "name": "ok", "capabilities": SERVICE_CAPS, **patch}
    r = api.client.post("/api/worker/register", json=body)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] == "invalid"
    assert api.workers() == []
    api.register("ok", token=token)  # the token was not consumed


def test_non_json_body_is_a_json_error(api: Api) -> None:
    r = api.client.post(
        "/api/worker/register", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert r.status_code == 422
    assert set(r.json()["error"]) == {"code", "message"}


def test_runnable_limits_assignments(api: Api) -> None:
    w = api.register("picky", runnable=["ner", "ocr"])
    assert sorted(s["name"] for s in w.body["assignments"]) == ["ner", "ocr"]


def test_labels_are_honoured(api: Api) -> None:
    w = api.register("only-llm", labels={"rma.services": "llm"})
    assert [s["name"] for s in w.body["assignments"]] == ["llm"]
