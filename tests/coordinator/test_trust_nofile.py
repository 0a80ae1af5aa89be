"""The coordinator raises its open-file limit to the hard limit before it serves."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = """
import resource, sys
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (min(256, hard), hard))
from fastapi import FastAPI
from rma.coordinator.serve import server_config
from rma.settings import CoordinatorSettings
app = FastAPI()
config = server_config(CoordinatorSettings(data_dir=sys.argv[1]), app, "warning")
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
print(soft, hard, app.state.connections.max_connections)
"""


def test_server_config_raises_the_open_file_limit(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path / "data")],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.split()
    soft, hard, cap = (int(x) for x in out)
    assert soft == hard or soft >= 1 << 20  # an unlimited hard limit: a large soft one
    assert 64 <= cap < soft  # the connection cap leaves descriptors for the rest
