"""Service runtimes behind one interface; :func:`select_runtime` picks one.

The docker runtime (and the ``docker`` SDK) is imported only when it is asked for or probed.
"""

from __future__ import annotations

from pathlib import Path

from rma import install_hint
from rma.agent.policy import Limits
from rma.agent.runtimes.base import Handle, Runtime, RuntimeFailure
from rma.agent.runtimes.process import ProcessRuntime

__all__ = ["Handle", "ProcessRuntime", "Runtime", "RuntimeFailure", "select_runtime"]


def select_runtime(
    kind: str,
    data_dir: Path,
    *,
    agent_key: str,
    network: str = "auto",
    bind_host: str = "127.0.0.1",
    gpus: bool = False,
    limits: Limits | None = None,
    image_prefix: str = "",
) -> Runtime:
    """``docker``, ``process``, or ``auto`` (docker when an engine answers, else process).

    Raises :class:`RuntimeFailure` when ``docker`` is asked for and no engine answers.
    """
    if kind == "process":
        return ProcessRuntime(data_dir, limits=limits)
    if kind == "auto":
        from rma.agent.hardware import docker_info

        if not docker_info().available:
            return ProcessRuntime(data_dir, limits=limits)  # and the docker SDK is never loaded
    try:
        from rma.agent.runtimes.docker import DockerRuntime, EngineUnavailable
    except ImportError:
        if kind == "docker":
            raise RuntimeFailure(
                f"--runtime docker: the docker SDK is not installed ({install_hint('docker')})"
            ) from None
        return ProcessRuntime(data_dir, limits=limits)
    try:
        return DockerRuntime.connect(
            data_dir,
            agent_key=agent_key,
            network=network,
            bind_host=bind_host,
            gpus=gpus,
            limits=limits,
            image_prefix=image_prefix,
        )
    except EngineUnavailable as exc:
        if kind == "docker":
            raise RuntimeFailure(f"--runtime docker: {exc}") from None
        return ProcessRuntime(data_dir, limits=limits)
