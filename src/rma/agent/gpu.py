"""NVIDIA GPUs through NVML (``nvidia-ml-py``, imported as ``pynvml``).

No ``nvidia-ml-py``, no driver, no GPU: no GPUs, and the reason in :attr:`Nvml.absent`; never an
exception.  The NVML module can be injected (tests feed recorded hardware profiles through a fake
module, since no GPU can exist on a CI machine).
"""

from __future__ import annotations

import contextlib
import importlib
from types import ModuleType
from typing import Any

from rma import install_hint
from rma.schemas.api import GpuInfo, Load

_MB = 1024 * 1024


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


class Nvml:
    """An NVML session: ``init`` once, read GPUs and their load any number of times, ``close``."""

    def __init__(self, module: ModuleType | None = None) -> None:
        self._module = module
        self._nvml: Any = None
        #: Why there are no GPUs (``None`` when NVML answered, even with zero devices).
        self.absent: str | None = None
        self.driver: str | None = None

    def init(self) -> bool:
        """Start NVML; ``False`` (and :attr:`absent` set) when it cannot be used here."""
        if self._nvml is not None:
            return True
        nvml = self._module
        if nvml is None:
            try:
                nvml = importlib.import_module("pynvml")
            except ImportError:
                self.absent = f"nvidia-ml-py is not installed ({install_hint('gpu')})"
                return False
        try:
            nvml.nvmlInit()
        except Exception as exc:  # NVMLError_LibraryNotFound, _DriverNotLoaded, ... or worse
            self.absent = f"NVML unavailable: {_reason(nvml, exc)}"
            return False
        self._nvml = nvml
        self.absent = None
        try:
            self.driver = _text(nvml.nvmlSystemGetDriverVersion())
        except Exception:
            self.driver = None
        return True

    def close(self) -> None:
        if self._nvml is not None:
            with contextlib.suppress(Exception):  # shutting down: nothing useful to do
                self._nvml.nvmlShutdown()
            self._nvml = None

    def gpus(self) -> list[GpuInfo]:
        """Every GPU NVML sees; a device that fails to answer is skipped."""
        if not self.init():
            return []
        nvml = self._nvml
        try:
            count = int(nvml.nvmlDeviceGetCount())
        except Exception as exc:
            self.absent = f"NVML unavailable: {_reason(nvml, exc)}"
            return []
        out: list[GpuInfo] = []
        for index in range(count):
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                name = _text(nvml.nvmlDeviceGetName(handle))
                mem = nvml.nvmlDeviceGetMemoryInfo(handle)
            except Exception:  # noqa: S112 - a lost device is not a reason to fail the rest
                continue
            util: float | None
            try:
                util = float(nvml.nvmlDeviceGetUtilizationRates(handle).gpu)
            except Exception:
                util = None
            try:
                uuid: str | None = _text(nvml.nvmlDeviceGetUUID(handle))
            except Exception:
                uuid = None
            out.append(
                GpuInfo(
                    name=name[:200],
                    memory_mb=int(mem.total) // _MB,
                    memory_free_mb=int(mem.free) // _MB,
                    utilization_percent=min(max(util, 0.0), 100.0) if util is not None else None,
                    driver=self.driver,
                    uuid=uuid,
                    index=index,
                )
            )
        return out

    def load(self) -> tuple[float | None, float | None]:
        """Mean GPU utilisation and memory use in percent, or ``(None, None)`` without GPUs."""
        gpus = self.gpus()
        if not gpus:
            return None, None
        utils = [g.utilization_percent for g in gpus if g.utilization_percent is not None]
        total = sum(g.memory_mb for g in gpus)
        used = sum(g.memory_mb - (g.memory_free_mb or 0) for g in gpus)
        util = sum(utils) / len(utils) if utils else None
        mem = 100.0 * used / total if total else None
        return util, mem


def _reason(nvml: Any, exc: Exception) -> str:
    not_found = getattr(nvml, "NVMLError_LibraryNotFound", None)
    if isinstance(not_found, type) and isinstance(exc, not_found):
        return "the NVIDIA driver library (libnvidia-ml) is not installed"
    return str(exc) or type(exc).__name__


def detect_gpus(module: ModuleType | None = None) -> tuple[list[GpuInfo], str | None]:
    """The GPUs of this machine and, when there are none, why."""
    nvml = Nvml(module)
    try:
        gpus = nvml.gpus()
        if gpus:
            return gpus, None
        return gpus, nvml.absent or "NVML answered but found no GPU"
    finally:
        nvml.close()


def gpu_load(nvml: Nvml) -> Load:
    """A :class:`Load` holding only the GPU fields (merged into the agent's load report)."""
    util, mem = nvml.load()
    return Load(gpu_percent=util, gpu_memory_percent=mem)
