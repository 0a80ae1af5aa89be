"""What this machine has (``rma worker detect``): CPU, RAM, disk, OS, Docker, NVIDIA GPUs, tier.

Anything that cannot be found (no NVML, no driver, no Docker engine) is reported as absent, with
the reason; detection never fails.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import psutil

from rma import install_hint
from rma.agent.gpu import detect_gpus
from rma.catalog import TierPolicy, TierRefused
from rma.schemas.api import Capabilities

_MB = 1024 * 1024


@dataclass(slots=True)
class DockerInfo:
    available: bool
    version: str | None = None
    reason: str | None = None


@dataclass(slots=True)
class Detection:
    capabilities: Capabilities
    docker: DockerInfo
    gpu_absent: str | None
    data_dir: Path
    cpu_physical_cores: int | None
    tier: int | None
    tier_name: str | None
    tier_refused: str | None

    def to_json(self) -> dict[str, Any]:
        caps = self.capabilities
        return {
            "cpu": {
                "model": caps.cpu_model,
                "cores": caps.cpu_cores,
                "physical_cores": self.cpu_physical_cores,
            },
            "memory": {"total_mb": caps.memory_mb, "available_mb": caps.memory_available_mb},
            "disk": {"path": str(self.data_dir), "free_mb": caps.disk_free_mb},
            "os": caps.os,
            "arch": caps.arch,
            "docker": {
                "available": self.docker.available,
                "version": self.docker.version,
                "reason": self.docker.reason,
            },
            "gpus": [g.model_dump(mode="json") for g in caps.gpus],
            "gpus_absent_reason": self.gpu_absent,
            "tier": self.tier,
            "tier_name": self.tier_name,
            "tier_refused": self.tier_refused,
            "capabilities": caps.model_dump(mode="json"),
        }


def cpu_model() -> str | None:
    """The CPU's marketing name, where the OS tells it."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Model", "Hardware") and value.strip():
                    return value.strip()[:200]
    except OSError:
        pass
    if platform.system() == "Darwin":
        try:
            out = subprocess.run(
                ["sysctl", "-n", "machdep.cpu.brand_string"],
                capture_output=True,
                text=True,
                timeout=2,
                check=False,
            )
            if out.stdout.strip():
                return out.stdout.strip()[:200]
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor()[:200] or None


def cpu_cores() -> int:
    """CPUs this process may use (its affinity / cgroup share where the OS says)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, psutil.cpu_count(logical=True) or 1)


def disk_free_mb(path: Path) -> int:
    """Free space where ``path`` is (or would be: its nearest existing parent)."""
    p = path.expanduser().absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return int(shutil.disk_usage(p).free // _MB)
    except OSError:
        return 0


def docker_info(timeout: float = 3.0) -> DockerInfo:
    """Whether a Docker engine answers, asked over its API without loading the docker SDK.

    ``DOCKER_HOST`` is honoured for ``unix://`` and plain ``tcp://``; with TLS settings the SDK
    asks instead.
    """
    host = os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
    if os.environ.get("DOCKER_TLS_VERIFY") or os.environ.get("DOCKER_CERT_PATH"):
        return _docker_info_sdk(timeout)
    try:
        if host.startswith("unix://"):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            address: Any = host[len("unix://") :]
        elif host.startswith("tcp://"):
            name, _, port = host[len("tcp://") :].rstrip("/").rpartition(":")
            sock = socket.socket(socket.AF_INET6 if ":" in name else socket.AF_INET)
            address = (name.strip("[]"), int(port))
        else:
            return _docker_info_sdk(timeout)
        with sock:
            sock.settimeout(timeout)
            sock.connect(address)
            sock.sendall(b"GET /version HTTP/1.0\r\nHost: docker\r\n\r\n")
            raw = b""
            while chunk := sock.recv(65536):
                raw += chunk
                if len(raw) > 1 << 20:
                    break
        head, _, body = raw.partition(b"\r\n\r\n")
        status = head.split(b" ", 2)[1] if head.count(b" ") >= 1 else b""
        if status != b"200":
            raise ValueError(f"answered {head[:60]!r}")
        version = str(json.loads(body).get("Version", "unknown"))
    except (OSError, ValueError, AttributeError) as exc:
        return DockerInfo(False, reason=f"no Docker engine answers at {host}: {exc}")
    return DockerInfo(True, version=version)


def _docker_info_sdk(timeout: float) -> DockerInfo:
    try:
        from rma.agent.runtimes.docker import EngineUnavailable, engine_version
    except ImportError:
        return DockerInfo(
            False, reason=f"the docker SDK is not installed ({install_hint('docker')})"
        )
    try:
        return DockerInfo(True, version=engine_version(timeout))
    except EngineUnavailable as exc:
        return DockerInfo(False, reason=str(exc))


def detect(
    data_dir: Path,
    *,
    nvml: ModuleType | None = None,
    docker: DockerInfo | None = None,
    policy: TierPolicy | None = None,
) -> Detection:
    """Everything ``rma worker detect`` shows.  ``nvml`` replaces ``pynvml`` (tests)."""
    vm = psutil.virtual_memory()
    gpus, gpu_absent = detect_gpus(nvml)
    dock = docker if docker is not None else docker_info()
    caps = Capabilities(
        cpu_cores=min(cpu_cores(), 4096),
        memory_mb=int(vm.total // _MB),
        memory_available_mb=int(vm.available // _MB),
        disk_free_mb=disk_free_mb(data_dir),
        gpus=gpus,
        docker=dock.available,
        os=platform.system().lower()[:100],
        arch=platform.machine().lower()[:50],
        cpu_model=cpu_model(),
    )
    tier: int | None = None
    tier_name: str | None = None
    refused: str | None = None
    try:
        t = (policy or TierPolicy()).tier_for(caps)
        tier, tier_name = int(t), t.label
    except TierRefused as exc:
        refused = str(exc)
    return Detection(
        capabilities=caps,
        docker=dock,
        gpu_absent=gpu_absent,
        data_dir=data_dir,
        cpu_physical_cores=psutil.cpu_count(logical=False),
        tier=tier,
        tier_name=tier_name,
        tier_refused=refused,
    )
