"""Tier policy: which tier a machine gets, or why it is refused."""

from __future__ import annotations

from dataclasses import dataclass

from rma.schemas.api import Capabilities
from rma.schemas.enums import Tier


class TierRefused(ValueError):
    """The machine is below every tier; the message says why."""


@dataclass(frozen=True, slots=True)
class TierPolicy:
    gpu_min_vram_mb: int = 8192
    service_min_memory_mb: int = 4096
    service_min_cores: int = 2
    data_min_memory_mb: int = 2048

    def tier_for(self, caps: Capabilities) -> Tier:
        if caps.max_vram_mb >= self.gpu_min_vram_mb:
            return Tier.GPU
        if (
            caps.memory_mb >= self.service_min_memory_mb
            and caps.cpu_cores >= self.service_min_cores
        ):
            return Tier.SERVICE
        if caps.memory_mb >= self.data_min_memory_mb:
            return Tier.DATA
        raise TierRefused(
            f"this machine has {caps.memory_mb} MB of RAM; the smallest tier (data) needs "
            f"{self.data_min_memory_mb} MB"
        )
