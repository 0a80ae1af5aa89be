"""NVIDIA GPU detection through NVML.

No GPU can exist on this machine or in CI, so the GPU cases feed recorded hardware profiles
(tests/fixtures/hardware/*.json, values as NVML reports them) through a fake ``pynvml`` module:
the only mock in these tests, standing in for hardware that is not here.  The absent cases use
the real ``nvidia-ml-py`` where it is installed (no driver here: ``NVMLError_LibraryNotFound``).
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from rma.agent.gpu import Nvml, detect_gpus
from rma.agent.hardware import DockerInfo, detect
from rma.catalog import TierPolicy
from rma.cli.main import app
from rma.schemas.api import Capabilities

from .conftest import FIXTURES

PROFILES = sorted(FIXTURES.glob("*.json"))


class _NVMLError(Exception):
    pass


class _NotSupported(_NVMLError):
    pass


class _LibraryNotFound(_NVMLError):
    pass


def fake_nvml(profile: dict[str, Any], *, init_error: Exception | None = None) -> types.ModuleType:
    """A stand-in for ``pynvml`` answering from a recorded profile (no GPU can exist here)."""
    nvml = types.ModuleType("pynvml")
    devices = profile["nvml"]["devices"]
    calls: list[str] = []

    def init() -> None:
        calls.append("init")
        if init_error is not None:
            raise init_error

    def memory(h: int) -> Any:
        d = devices[h]
        return types.SimpleNamespace(
            total=d["memory_total"],
            free=d["memory_free"],
            used=d["memory_total"] - d["memory_free"],
        )

    def utilization(h: int) -> Any:
        d = devices[h]
        if d["utilization_gpu"] is None:
            raise _NotSupported("Not Supported")
        return types.SimpleNamespace(gpu=d["utilization_gpu"], memory=d["utilization_memory"])

    nvml.NVMLError = _NVMLError  # type: ignore[attr-defined]
    nvml.NVMLError_LibraryNotFound = _LibraryNotFound  # type: ignore[attr-defined]
    nvml.nvmlInit = init  # type: ignore[attr-defined]
    nvml.nvmlShutdown = lambda: calls.append("shutdown")  # type: ignore[attr-defined]
    nvml.nvmlSystemGetDriverVersion = lambda: profile["nvml"]["driver"]  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetCount = lambda: len(devices)  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetHandleByIndex = lambda i: i  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetName = lambda h: devices[h]["name"].encode()  # old bindings: bytes
    nvml.nvmlDeviceGetMemoryInfo = memory  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetUtilizationRates = utilization  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetUUID = lambda h: devices[h]["uuid"]  # type: ignore[attr-defined]
    nvml.calls = calls  # type: ignore[attr-defined]
    return nvml


@pytest.mark.parametrize("path", PROFILES, ids=[p.stem for p in PROFILES])
def test_recorded_profiles_give_gpus_and_tier(path: Path) -> None:
    profile = json.loads(path.read_text())
    expected = profile["expected"]
    nvml = fake_nvml(profile)

    gpus, absent = detect_gpus(nvml)

    assert len(gpus) == expected["gpus"]
    assert nvml.calls == ["init", "shutdown"]  # type: ignore[attr-defined]
    for i, (gpu, dev) in enumerate(zip(gpus, profile["nvml"]["devices"], strict=True)):
        assert gpu.name == dev["name"]
        assert gpu.memory_mb == dev["memory_total"] // (1 << 20)
        assert gpu.memory_free_mb == dev["memory_free"] // (1 << 20)
        assert gpu.utilization_percent == dev["utilization_gpu"]
        assert gpu.driver == profile["nvml"]["driver"]
        assert gpu.uuid == dev["uuid"]
        assert gpu.index == i
    assert (absent is None) == bool(gpus)
    caps = Capabilities(
        cpu_cores=profile["machine"]["cpu_cores"],
        memory_mb=profile["machine"]["memory_mb"],
        gpus=gpus,
    )
    assert caps.max_vram_mb == expected["max_vram_mb"]
    tier = TierPolicy().tier_for(caps)
    assert (int(tier), tier.label) == (expected["tier"], expected["tier_name"])


@pytest.mark.parametrize("path", PROFILES, ids=[p.stem for p in PROFILES])
def test_gpu_load_is_the_mean_of_the_devices(path: Path) -> None:
    profile = json.loads(path.read_text())
    nvml = Nvml(fake_nvml(profile))
    try:
        util, mem = nvml.load()
    finally:
        nvml.close()
    assert util == profile["expected"]["gpu_percent"]
    devices = profile["nvml"]["devices"]
    if devices:
        total = sum(d["memory_total"] // (1 << 20) for d in devices)
        free = sum(d["memory_free"] // (1 << 20) for d in devices)
        assert mem == pytest.approx(100 * (total - free) / total)
    else:
        assert mem is None


def test_detect_reports_the_recorded_machine_tier(tmp_path: Path) -> None:
    profile = json.loads((FIXTURES / "h100-80gb-x2.json").read_text())
    found = detect(tmp_path, nvml=fake_nvml(profile), docker=DockerInfo(False, reason="test"))
    assert [g.name for g in found.capabilities.gpus] == ["NVIDIA H100 80GB HBM3"] * 2
    assert (found.tier, found.tier_name) == (1, "gpu")  # one 80 GB GPU is enough for tier 1
    doc = found.to_json()
    assert doc["gpus"][1]["utilization_percent"] == 64
    assert doc["gpus_absent_reason"] is None


def test_cli_detect_shows_an_injected_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """`rma worker detect --json` reads NVML through `import pynvml`: the fake is put there."""
    profile = json.loads((FIXTURES / "rtx-4090.json").read_text())
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(profile))
    result = CliRunner().invoke(app, ["worker", "detect", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert [g["name"] for g in doc["gpus"]] == ["NVIDIA GeForce RTX 4090"]
    assert doc["gpus"][0]["driver"] == "555.85"
    assert doc["tier_name"] == "gpu"


def test_library_not_found_means_no_gpus(tmp_path: Path) -> None:
    """The driver's library missing (NVMLError_LibraryNotFound): no GPUs, a reason, no crash."""
    pynvml = pytest.importorskip("pynvml", reason="needs nvidia-ml-py: pip install 'rma-pool[gpu]'")
    profile = json.loads((FIXTURES / "rtx-4090.json").read_text())
    nvml = fake_nvml(profile, init_error=pynvml.NVMLError_LibraryNotFound())
    nvml.NVMLError_LibraryNotFound = pynvml.NVMLError_LibraryNotFound  # type: ignore[attr-defined]
    gpus, absent = detect_gpus(nvml)
    assert gpus == []
    assert absent is not None
    assert "libnvidia-ml" in absent
    found = detect(tmp_path, nvml=nvml, docker=DockerInfo(False, reason="test"))
    assert found.capabilities.gpus == []
    assert found.gpu_absent == absent


def test_real_nvml_on_this_machine_never_crashes() -> None:
    """The real nvidia-ml-py against whatever this machine has (no NVIDIA driver here, none in
    CI): it either lists GPUs or says why there are none."""
    pytest.importorskip("pynvml", reason="needs nvidia-ml-py: pip install 'rma-pool[gpu]'")
    gpus, absent = detect_gpus()
    assert gpus or (absent and absent.startswith(("NVML unavailable", "NVML answered")))


def test_nvidia_ml_py_absent_means_no_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # `import pynvml` raises ImportError
    gpus, absent = detect_gpus()
    assert gpus == []
    assert absent is not None
    assert "nvidia-ml-py is not installed" in absent
    result = CliRunner().invoke(app, ["worker", "detect", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["gpus"] == []
    assert "nvidia-ml-py" in doc["gpus_absent_reason"]


def test_a_device_that_stops_answering_is_skipped() -> None:
    profile = json.loads((FIXTURES / "h100-80gb-x2.json").read_text())
    nvml = fake_nvml(profile)

    def memory(h: int) -> Any:
        if h == 0:
            raise _NVMLError("GPU is lost")
        d = profile["nvml"]["devices"][h]
        return types.SimpleNamespace(total=d["memory_total"], free=d["memory_free"])

    nvml.nvmlDeviceGetMemoryInfo = memory  # type: ignore[attr-defined]
    gpus, _ = detect_gpus(nvml)
    assert [g.index for g in gpus] == [1]
