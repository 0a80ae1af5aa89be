"""A NUL character in a request's string is a 422 that changes nothing (PostgreSQL cannot store
one: it was a 500 there, found by the schemathesis fuzzing)."""

from __future__ import annotations

from .conftest import Api


def test_nul_in_register_strings_is_422(api: Api) -> None:
    for field in ("worker_id", "owner", "version"):
        r = api.register("w1", expect=422, **{field: "a\x00b"})
        assert r.json()["error"]["message"].startswith(f"{field}:"), r.text
        assert "NUL" in r.json()["error"]["message"]
    assert api.workers() == []  # nothing was registered
    caps = {"cpu_cores": 2, "memory_mb": 8192, "arch": "x86\x00"}
    assert api.register("w2", caps, expect=422).status_code == 422


def test_nul_in_a_key_name_is_422(api: Api) -> None:
    r = api.client.post("/api/admin/keys", json={"name": "k\x00"}, headers=api.admin)
    assert r.status_code == 422, r.text
    assert api.client.get("/api/admin/keys", headers=api.admin).json() == []
