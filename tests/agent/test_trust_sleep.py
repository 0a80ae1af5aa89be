"""The sleeping laptop: a real agent stopped (SIGSTOP) past the removal window comes back as the
same worker without a token; one the operator removed is told so and exits."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import pytest

from .conftest import admin_workers, root_conftest, wait_for
from .test_e2e import join_args

pytestmark = pytest.mark.slow


def test_a_laptop_asleep_past_the_removal_window_rejoins_as_itself(
    tmp_path: Path, database_url: str, echo_catalog: Path, agent_factory: Any
) -> None:
    coord = root_conftest().start_coordinator(
        tmp_path / "coord",
        database_url=database_url,
        extra_args=["--catalog", str(echo_catalog)],
        env={
            "RMA_HEARTBEAT_INTERVAL": "1",
            "RMA_OFFLINE_AFTER": "2",
            "RMA_REMOVE_AFTER": "3",
            "RMA_RESTART_GRACE": "0",
            "RMA_SWEEP_INTERVAL": "0.3",
        },
    )
    try:
        agent = agent_factory(coord.url, "--token", coord.token(uses=1), *join_args(echo_catalog))
        (w,) = wait_for(lambda: [x for x in admin_workers(coord) if x["status"] == "online"], 60)
        agent.signal(signal.SIGSTOP)  # the lid closes
        try:
            wait_for(lambda: admin_workers(coord)[0]["status"] == "removed", 30, every=0.2)
            assert admin_workers(coord)[0]["revoked"] is False
        finally:
            agent.signal(signal.SIGCONT)  # and opens again
        back = wait_for(
            lambda: [x for x in admin_workers(coord) if x["status"] == "online"], 60, every=0.2
        )
        assert [x["id"] for x in back] == [w["id"]]  # its old id, and no new token was needed
        assert agent.alive()
        with coord.admin() as c:
            events = c.get("/api/admin/events", params={"limit": 1000}).json()
        assert any(e["kind"] == "rejoined" and e["worker_id"] == w["id"] for e in events)
        out = agent.output()
        assert "removed this worker after a long silence" in out
        assert "not the operator" in out
    finally:
        coord.stop()
