"""``rma admin services`` and ``rma admin catalog reload`` against a real coordinator process."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from .conftest import Invoke, json_out

pytestmark = pytest.mark.slow


def test_services_and_catalog_reload(rma: Invoke, coordinator_process: Any) -> None:
    token = json_out(rma("admin", "tokens", "create", "--json"))["token"]
    r = httpx.post(
        f"{coordinator_process.url}/api/worker/register",
        json={"token": token, "name": "w1", "capabilities": {"cpu_cores": 4, "memory_mb": 8192}},
        timeout=10,
    )
    assert r.status_code == 201, r.text
    rows = {x["name"]: x for x in json_out(rma("admin", "services", "--json"))}
    assert rows["llm"]["wanted"] == 1 and rows["llm"]["assigned"] == 1
    assert rows["llm"]["healthy"] == 0  # assigned, not yet reported healthy
    assert rows["vllm"]["assigned"] == 0  # no GPU worker
    assert {"inflight", "queued", "last_scaling_event"} <= set(rows["llm"])
    shown = rma("admin", "services")
    assert shown.exit_code == 0
    assert "llm" in shown.stdout and "IN FLIGHT" in shown.stdout
    reloaded = json_out(rma("admin", "catalog", "reload", "--json"))
    assert reloaded["count"] == len(rows)
    assert "llm" in reloaded["services"]


def test_data_services_are_listed_only_where_wanted(rma: Invoke, coordinator_process: Any) -> None:
    """A pool whose one worker offers no database lists no data service (not as down); ``--all``
    shows them, with no holder and no backup."""
    token = json_out(rma("admin", "tokens", "create", "--json"))["token"]
    r = httpx.post(
        f"{coordinator_process.url}/api/worker/register",
        json={
            "token": token,
            "name": "w1",
            "capabilities": {"cpu_cores": 4, "memory_mb": 8192},
            "runnable": ["llm"],
        },
        timeout=10,
    )
    assert r.status_code == 201, r.text
    rows = {x["name"]: x for x in json_out(rma("admin", "services", "--json"))}
    assert "llm" in rows
    assert not {"postgres", "redis"} & set(rows)
    shown = rma("admin", "services")
    assert shown.exit_code == 0 and "postgres" not in shown.stdout
    every = {x["name"]: x for x in json_out(rma("admin", "services", "--all", "--json"))}
    assert every["postgres"]["holder"] is None and every["postgres"]["last_backup"] is None
    assert every["postgres"]["assigned"] == 0 and "holder" not in every["llm"]
