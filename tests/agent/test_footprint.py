"""The agent's idle footprint, measured with psutil on a real agent process.

An idle agent (joined, one healthy service, default 30 s heartbeats) must stay under 60 MB RSS
and 1% CPU.  The test measures ``FOOTPRINT_SECONDS`` (default 15); docs/agent.md records a
60-second run:

    FOOTPRINT_SECONDS=60 .venv/bin/pytest tests/agent/test_footprint.py -s
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from .conftest import admin_workers, root_conftest, wait_for

pytestmark = pytest.mark.slow

RSS_LIMIT_MB = 60
CPU_LIMIT_PERCENT = 1.0


@pytest.mark.parametrize("transport", ["tunnel", "direct"])
def test_idle_agent_footprint(
    transport: str, tmp_path: Path, database_url: str, echo_catalog: Path, agent_factory: Any
) -> None:
    coord = root_conftest().start_coordinator(
        tmp_path / "coord", database_url=database_url, extra_args=["--catalog", str(echo_catalog)]
    )
    try:
        args = ["--runtime", "process", "--transport", transport, "--catalog", str(echo_catalog)]
        agent = agent_factory(
            coord.url, "--token", coord.token(), *args, "--label", "rma.services=echo"
        )

        def healthy() -> bool:
            return any(s["healthy"] for w in admin_workers(coord) for s in w["services"])

        wait_for(healthy, 60, every=0.5)
        assert agent.proc is not None
        proc = psutil.Process(agent.proc.pid)
        time.sleep(2)  # let start-up work settle
        seconds = float(os.environ.get("FOOTPRINT_SECONDS", "15"))
        cpu_before = proc.cpu_times()
        started = time.monotonic()
        peak = 0
        while time.monotonic() - started < seconds:
            peak = max(peak, proc.memory_info().rss)
            time.sleep(0.5)
        cpu_after = proc.cpu_times()
        elapsed = time.monotonic() - started
        used = (cpu_after.user - cpu_before.user) + (cpu_after.system - cpu_before.system)
        cpu_percent = 100 * used / elapsed
        rss_mb = peak / (1 << 20)
        print(
            f"\nidle agent ({transport}) over {elapsed:.0f}s: peak RSS {rss_mb:.1f} MB, "
            f"CPU {cpu_percent:.2f}% ({used:.2f}s of CPU)"
        )
        assert agent.alive()
        assert rss_mb < RSS_LIMIT_MB
        assert cpu_percent < CPU_LIMIT_PERCENT
    finally:
        coord.stop()
