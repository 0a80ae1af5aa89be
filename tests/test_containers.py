"""The compose files in ``containers/``: valid for ``docker compose config``, and every file they
name (Dockerfiles, mounted configs) exists."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONTAINERS = ROOT / "containers"
COMPOSE_FILES = sorted(CONTAINERS.glob("compose*.yaml"))
#: Overlays are checked on top of the base file, as their header says to run them.
BASE = CONTAINERS / "compose.yaml"


def _compose_command() -> list[str] | None:
    """``docker compose`` (the plugin) or ``docker-compose``, whichever answers."""
    candidates: list[list[str]] = []
    if shutil.which("docker"):
        candidates.append(["docker", "compose"])
    if shutil.which("docker-compose"):
        candidates.append(["docker-compose"])
    for cmd in candidates:
        try:
            done = subprocess.run([*cmd, "version"], capture_output=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if done.returncode == 0:
            return cmd
    return None


def _files_for(path: Path) -> list[Path]:
    return [path] if path == BASE else [BASE, path]


def test_there_are_compose_files() -> None:
    assert BASE in COMPOSE_FILES
    assert CONTAINERS / "compose.monitoring.yaml" in COMPOSE_FILES


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_compose_names_only_files_that_exist(path: Path) -> None:
    data: dict[str, Any] = yaml.safe_load(path.read_text())
    assert isinstance(data.get("services"), dict)
    for name, service in data["services"].items():
        build = service.get("build")
        if isinstance(build, dict):
            context = (path.parent / build.get("context", ".")).resolve()
            dockerfile = context / build.get("dockerfile", "Dockerfile")
            assert dockerfile.is_file(), f"{name}: {dockerfile} is missing"
        for volume in service.get("volumes", []):
            source = str(volume).split(":", 1)[0]
            if source.startswith((".", "/")):
                assert (path.parent / source).exists(), f"{name}: {source} is missing"
            else:
                assert source in (data.get("volumes") or {}), f"{name}: volume {source} undeclared"


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_docker_compose_config_is_valid(path: Path) -> None:
    cmd = _compose_command()
    if cmd is None:
        pytest.skip("neither `docker compose` nor `docker-compose` is installed")
    args = [*cmd, "--project-directory", str(CONTAINERS)]
    for f in _files_for(path):
        args += ["-f", str(f)]
    env = {**os.environ, "RMA_TOKEN": "rma_join_for-the-config-check"}
    done = subprocess.run(
        [*args, "config", "--quiet"], capture_output=True, text=True, timeout=60, env=env
    )
    assert done.returncode == 0, done.stderr
