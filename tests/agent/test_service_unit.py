"""`rma worker service install|status|uninstall` writing into a temp dir (never enabling a real
unit): the systemd unit passes `systemd-analyze verify`, the launchd plist has the right keys."""

from __future__ import annotations

import json
import os
import plistlib
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

JOIN = ["--coordinator", "https://pool.example:8420", "--token", "s3cret-token", "--max-cpu", "2"]


def rma(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k != "RMA_COORDINATOR_URL"}
    return subprocess.run(
        [sys.executable, "-m", "rma", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**base, **(env or {})},
        check=False,
    )


def install(tmp_path: Path, *extra: str) -> dict[str, Any]:
    res = rma(
        "worker",
        "service",
        "install",
        "--unit-dir",
        str(tmp_path / "units"),
        "--data-dir",
        str(tmp_path / "my data"),
        "--no-enable",
        "--json",
        *extra,
    )
    assert res.returncode == 0, res.stderr
    return dict(json.loads(res.stdout))


@pytest.mark.parametrize("scope", ["--user", "--system"])
def test_systemd_unit_verifies(tmp_path: Path, scope: str) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("needs systemd-analyze")
    doc = install(tmp_path, "--platform", "linux", scope, *JOIN, "--label", "note=50% off")
    unit = Path(doc["path"])
    assert unit == tmp_path / "units" / "rma-worker.service"
    text = unit.read_text()
    res = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60, check=False
    )
    assert res.returncode == 0, res.stderr
    assert unit.name not in res.stderr, res.stderr  # it reports parse problems but exits 0
    data_dir = (tmp_path / "my data").resolve()
    assert "Restart=on-failure" in text
    assert f'--data-dir "{data_dir}"' in text  # the identity stays in this data dir
    assert "--max-cpu 2" in text and '"note=50%% off"' in text
    assert ("User=" in text) is (scope == "--system")
    assert ("multi-user.target" in text) is (scope == "--system")
    # the join token is not in the unit, but in a file only the owner reads
    assert "s3cret-token" not in text
    env_file = data_dir / "service.env"
    assert env_file.read_text() == "RMA_TOKEN=s3cret-token\n"
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    assert f"EnvironmentFile=-{env_file}" in text


def test_a_broken_unit_is_caught_by_the_check(tmp_path: Path) -> None:
    """The check above can fail: systemd-analyze names the unit when a line does not parse."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("needs systemd-analyze")
    unit = Path(install(tmp_path, "--platform", "linux", *JOIN)["path"])
    unit.write_text(unit.read_text().replace("Restart=on-failure", "Restart=sometimes"))
    res = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60, check=False
    )
    assert unit.name in res.stderr


def test_launchd_plist(tmp_path: Path) -> None:
    doc = install(tmp_path, "--platform", "macos", *JOIN)
    path = Path(doc["path"])
    assert path.name == "org.rma.worker.plist"
    plist = plistlib.loads(path.read_bytes())
    data_dir = str((tmp_path / "my data").resolve())
    assert plist["Label"] == "org.rma.worker"
    args = plist["ProgramArguments"]
    assert args[:5] == [sys.executable, "-m", "rma", "worker", "join"]
    assert args[5:7] == ["--data-dir", data_dir]
    assert "--token" not in args and "--max-cpu" in args
    assert plist["RunAtLoad"] is True
    assert plist["KeepAlive"] == {"SuccessfulExit": False}  # restarted when it fails
    assert plist["EnvironmentVariables"]["RMA_TOKEN"] == "s3cret-token"
    assert plist["StandardErrorPath"].startswith(data_dir)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # it holds the token


def test_status_and_uninstall(tmp_path: Path) -> None:
    common = ["--unit-dir", str(tmp_path / "units"), "--data-dir", str(tmp_path / "my data")]
    install(tmp_path, "--platform", "linux", *JOIN)
    res = rma("worker", "service", "status", "--platform", "linux", "--json", *common)
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["unit"]["installed"] is True
    assert doc["agent"]["running"] is False and doc["agent"]["state"] == "stopped"
    res = rma("worker", "service", "uninstall", "--platform", "linux", "--no-disable", *common)
    assert res.returncode == 0, res.stderr
    assert not (tmp_path / "units" / "rma-worker.service").exists()
    assert not (tmp_path / "my data" / "service.env").exists()
    res = rma("worker", "service", "status", "--platform", "linux", "--json", *common)
    assert json.loads(res.stdout)["unit"]["installed"] is False


def test_install_needs_a_coordinator(tmp_path: Path) -> None:
    res = rma(
        "worker",
        "service",
        "install",
        "--no-enable",
        "--unit-dir",
        str(tmp_path),
        "--platform",
        "linux",
    )
    assert res.returncode == 2
    assert "error:" in res.stderr and "--coordinator" in res.stderr
    assert "Traceback" not in res.stderr
    assert list(tmp_path.iterdir()) == []
