"""Hardware detection on this (real) machine, and `rma worker detect`."""

from __future__ import annotations

import json
import os
import platform
import shutil
import socket
from pathlib import Path

import psutil
import pytest
from typer.testing import CliRunner

from rma.agent.hardware import detect, disk_free_mb, docker_info
from rma.agent.programs import find_program
from rma.cli.main import app


def test_detect_reads_this_machine(tmp_path: Path) -> None:
    found = detect(tmp_path / "not" / "yet" / "created")
    caps = found.capabilities
    assert caps.cpu_cores == len(os.sched_getaffinity(0))
    total = psutil.virtual_memory().total // (1 << 20)
    assert caps.memory_mb == total
    assert caps.memory_available_mb is not None
    assert 0 < caps.memory_available_mb <= total
    # the data dir does not exist yet: its nearest existing parent's free space is reported
    assert abs(caps.disk_free_mb - shutil.disk_usage(tmp_path).free // (1 << 20)) < 512
    assert caps.os == platform.system().lower()
    assert caps.arch == platform.machine().lower()
    assert found.tier is not None or found.tier_refused


def test_docker_absent_is_reported_not_raised(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-docker.sock")
    info = docker_info(timeout=1)
    assert not info.available
    assert info.reason
    assert "no Docker engine answers" in info.reason
    assert detect(tmp_path).capabilities.docker is False


def test_docker_socket_that_is_not_an_engine(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Something listens on the socket but never answers like Docker: absent, within the timeout."""
    path = tmp_path / "fake.sock"
    with socket.socket(socket.AF_UNIX) as srv:
        srv.bind(str(path))
        srv.listen()
        monkeypatch.setenv("DOCKER_HOST", f"unix://{path}")
        info = docker_info(timeout=0.5)
    assert not info.available
    assert info.reason


def test_disk_free_of_an_existing_dir(tmp_path: Path) -> None:
    assert disk_free_mb(tmp_path) == shutil.disk_usage(tmp_path).free // (1 << 20)


def test_cli_detect_json_is_one_document(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-docker.sock")
    result = CliRunner().invoke(app, ["worker", "detect", "--json", "--data-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["cpu"]["cores"] >= 1
    assert doc["memory"]["total_mb"] > 0
    assert doc["disk"]["path"] == str(tmp_path)
    assert doc["docker"]["available"] is False
    assert doc["docker"]["reason"]
    assert doc["capabilities"]["docker"] is False
    # services whose process command needs a missing module or binary say why they cannot run
    assert set(doc["services"]) >= {"llm", "postgres", "vllm"}
    assert doc["services"]["vllm"] is not None  # an image only, and no engine here
    # the system's PostgreSQL runs on the process runtime where initdb is installed
    assert (doc["services"]["postgres"] is None) == (find_program("initdb") is not None)
    assert doc["services"]["chromadb"] is not None  # an image only


def test_cli_detect_human_output(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-docker.sock")
    result = CliRunner().invoke(app, ["worker", "detect"])
    assert result.exit_code == 0, result.output
    for word in ("CPU", "RAM", "disk", "Docker", "GPU", "tier", "absent"):
        assert word in result.stdout


def test_cli_detect_with_a_bad_catalog_fails_cleanly(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[services.x\n")
    result = CliRunner().invoke(app, ["worker", "detect", "--catalog", str(bad)])
    assert result.exit_code == 1
    assert "error:" in result.stderr
    assert "not valid TOML" in result.stderr
    assert "Traceback" not in result.output
