"""The interface every runtime (docker, process) implements."""

from __future__ import annotations

import socket
import sys
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from rma.schemas.api import ServiceSpec

#: Called with a human-readable progress line while an image is pulled.
Progress = Callable[[str], None]


class RuntimeFailure(Exception):
    """The service cannot run here as specified (bad image, pull failed, no engine).

    Terminal: the service is ``failed`` until its assignment changes.  Any other exception from a
    runtime counts as a crash and is retried with backoff.
    """


@dataclass(slots=True)
class Handle:
    """One running instance of a service."""

    service: str
    host_port: int
    ref: str  # a pid or a container id
    detail: Any = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class Inside:
    """Where a data service's backup tools run when not on the host: inside its container.

    ``run(argv, env)`` runs a program there and returns its exit code and output; ``port`` is
    the service's port there; ``data_dir`` is the service's folder as the program sees it (the
    host's folder, mounted), so files it writes there appear on the host.
    """

    run: Callable[[list[str], dict[str, str]], Awaitable[tuple[int, str]]]
    port: int
    data_dir: str


#: ``{gpu_memory_utilization}`` when the coordinator gave no share (vLLM's own default).
DEFAULT_GPU_SHARE = 0.9


def expand(
    text: str,
    *,
    port: int,
    data_dir: Path,
    gpu_share: float | None = None,
    host: str = "127.0.0.1",
) -> str:
    """Fill the catalog's placeholders: ``{python}``, ``{host}`` (the address the service listens
    on: loopback, or every address inside a bridge-networked container, whose published port is
    bound to loopback on the host), ``{port}``, ``{data_dir}`` and ``{gpu_memory_utilization}``
    (the share of its GPU the coordinator placed it on)."""
    return (
        text.replace("{python}", sys.executable)
        .replace("{host}", host)
        .replace("{port}", str(port))
        .replace("{data_dir}", str(data_dir))
        .replace("{gpu_memory_utilization}", f"{gpu_share or DEFAULT_GPU_SHARE:g}")
    )


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def image_unavailable(spec: ServiceSpec, *, gpus: bool) -> str | None:
    """Why the docker runtime cannot run ``spec`` (engine aside), or ``None``."""
    if not spec.image:
        return "no image for the docker runtime (it needs the process runtime)"
    if spec.gpu and not gpus:
        return "needs an NVIDIA GPU"
    return None


class Runtime(ABC):
    """Starts, watches and stops services.  All methods may block only in worker threads."""

    name: ClassVar[str]

    @abstractmethod
    def unavailable(self, spec: ServiceSpec) -> str | None:
        """Why this runtime cannot run ``spec`` on this machine, or ``None`` when it can."""

    async def prepare(self, spec: ServiceSpec, progress: Progress) -> None:  # noqa: B027
        """Make the service startable (pull its image); raise :class:`RuntimeFailure`."""

    @abstractmethod
    async def start(self, spec: ServiceSpec, host_port: int, data_dir: Path) -> Handle:
        """Start one instance listening on ``host_port``."""

    @abstractmethod
    async def exit_status(self, handle: Handle) -> str | None:
        """``None`` while it runs; otherwise how it ended (``"exited with code 1"``)."""

    @abstractmethod
    async def stop(self, service: str, handle: Handle | None, *, grace: float) -> None:
        """Stop and remove it (SIGTERM, then SIGKILL after ``grace`` seconds; 0: kill at once)."""

    @abstractmethod
    async def cleanup(self) -> list[str]:
        """Remove what an earlier run of this agent left behind; return what was removed."""

    def log_tail(self, handle: Handle, lines: int = 5) -> str:
        """The last lines the service wrote (for crash messages)."""
        return ""

    def inside(self, handle: Handle, spec: ServiceSpec) -> Inside | None:
        """Where ``spec``'s backup tools run (``pg_dumpall``, ``psql``); ``None``: on the host."""
        return None

    async def aclose(self) -> None:  # noqa: B027
        """Release the runtime's own resources (not the services)."""

    def describe(self) -> dict[str, Any]:
        return {"name": self.name}
