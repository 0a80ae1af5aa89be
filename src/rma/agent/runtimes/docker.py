"""The docker runtime, on the ``docker`` SDK (imported here only; the SDK blocks, so every call runs
in a worker thread).

Containers carry labels: ``rma.managed=true``, ``rma.agent=<agent key>`` (this host and data dir),
``rma.service=<name>``.  At start the agent removes every container with its own agent label: what
an earlier, crashed run of it left behind.

Networking: with a ``bridge`` network the service's container port (``port`` in the catalog) is
published on a free host port, and ``{port}`` in its environment is the container port.  Without
one (``dockerd --bridge=none``) or with ``network="host"``, containers share the host's network
and ``{port}`` is the host port the service must listen on. ``{host}`` is the address to listen
on: ``127.0.0.1`` with host networking, ``0.0.0.0`` inside a bridge-networked container (its
port is published on the host's loopback only, ``bind_host``).
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

import docker
from docker.errors import APIError, DockerException, ImageNotFound, NotFound
from docker.types import DeviceRequest
from docker.utils import parse_repository_tag

from rma.agent.policy import Limits
from rma.agent.runtimes.base import (
    Handle,
    Inside,
    Progress,
    Runtime,
    RuntimeFailure,
    expand,
    image_unavailable,
)
from rma.images import resolve
from rma.schemas.api import ServiceSpec

LABEL_MANAGED = "rma.managed"
LABEL_AGENT = "rma.agent"
LABEL_SERVICE = "rma.service"


class EngineUnavailable(Exception):
    """No Docker engine answers (or the SDK is missing)."""


def _explain(exc: Exception) -> str:
    if isinstance(exc, APIError):
        return str(exc.explanation or exc)
    return str(exc) or type(exc).__name__


def engine_version(timeout: float = 3.0) -> str:
    """The engine's version; raises :class:`EngineUnavailable` saying why there is none."""
    try:
        client = docker.DockerClient.from_env(timeout=int(max(timeout, 1)))
    except DockerException as exc:
        raise EngineUnavailable(f"no Docker engine answers: {_explain(exc)}") from None
    try:
        return str(client.version().get("Version", "unknown"))
    except (DockerException, OSError) as exc:
        raise EngineUnavailable(f"no Docker engine answers: {_explain(exc)}") from None
    finally:
        client.close()


class DockerRuntime(Runtime):
    name = "docker"

    def __init__(
        self,
        client: Any,
        data_dir: Path,
        *,
        agent_key: str,
        network: str = "auto",
        bind_host: str = "127.0.0.1",
        gpus: bool = False,
        stop_timeout: float = 10.0,
        limits: Limits | None = None,
        image_prefix: str = "",
    ) -> None:
        self.client = client
        self.image_prefix = image_prefix
        self.limits = limits or Limits()
        self.data_dir = data_dir
        self.agent_key = agent_key
        self.bind_host = bind_host
        self.gpus = gpus
        self.stop_timeout = stop_timeout
        if network == "auto":
            network = "bridge" if client.networks.list(names=["bridge"]) else "host"
        self.network = network
        self.version = str(client.version().get("Version", "unknown"))

    @classmethod
    def connect(
        cls,
        data_dir: Path,
        *,
        agent_key: str,
        network: str = "auto",
        bind_host: str = "127.0.0.1",
        gpus: bool = False,
        timeout: float = 5.0,
        limits: Limits | None = None,
        image_prefix: str = "",
    ) -> DockerRuntime:
        """A runtime on the engine from the environment (``DOCKER_HOST`` or the local socket)."""
        try:
            client = docker.DockerClient.from_env(timeout=int(max(timeout, 1)))
        except DockerException as exc:
            raise EngineUnavailable(f"no Docker engine answers: {_explain(exc)}") from None
        try:
            return cls(
                client,
                data_dir,
                agent_key=agent_key,
                network=network,
                bind_host=bind_host,
                gpus=gpus,
                limits=limits,
                image_prefix=image_prefix,
            )
        except (DockerException, OSError) as exc:
            client.close()
            raise EngineUnavailable(f"no Docker engine answers: {_explain(exc)}") from None

    def container_name(self, service: str) -> str:
        return f"rma-{self.agent_key}-{service}"

    # --- what can run ----------------------------------------------------------------------------

    def unavailable(self, spec: ServiceSpec) -> str | None:
        return image_unavailable(spec, gpus=self.gpus)

    # --- lifecycle -------------------------------------------------------------------------------

    def image(self, spec: ServiceSpec) -> str:
        """The image that runs ``spec``: a built-in ``rma/*`` one under the operator's prefix."""
        if not spec.image:
            raise RuntimeFailure("no image for the docker runtime")
        return resolve(spec.image, self.image_prefix)

    async def prepare(self, spec: ServiceSpec, progress: Progress) -> None:
        image = self.image(spec)
        try:
            await asyncio.to_thread(self.client.images.get, image)
            return
        except ImageNotFound:
            pass
        except (DockerException, OSError) as exc:
            raise ConnectionError(f"Docker engine: {_explain(exc)}") from None
        loop = asyncio.get_running_loop()

        def report(line: str) -> None:
            loop.call_soon_threadsafe(progress, line)

        report(f"pulling {image}")
        await asyncio.to_thread(self._pull, image, report)

    def _pull(self, image: str, report: Progress) -> None:
        repo, tag = parse_repository_tag(image)
        layers: dict[str, tuple[int, int]] = {}
        shown = -1
        try:
            for event in self.client.api.pull(repo, tag=tag or "latest", stream=True, decode=True):
                if "error" in event:
                    raise RuntimeFailure(f"cannot pull {image}: {event['error']}")
                detail = event.get("progressDetail") or {}
                if event.get("id") and detail.get("total"):
                    layers[event["id"]] = (int(detail.get("current", 0)), int(detail["total"]))
                if layers:
                    done = sum(c for c, _ in layers.values())
                    total = sum(t for _, t in layers.values())
                    percent = int(100 * done / total) if total else 0
                    if percent >= shown + 5:
                        shown = percent
                        report(f"pulling {image}: {percent}% of {total // (1 << 20)} MB")
        except (DockerException, OSError) as exc:
            raise RuntimeFailure(f"cannot pull {image}: {_explain(exc)}") from None

    async def start(self, spec: ServiceSpec, host_port: int, data_dir: Path) -> Handle:
        if not spec.image:
            raise RuntimeFailure("no image for the docker runtime")
        return await asyncio.to_thread(self._start, spec, host_port, data_dir)

    def _start(self, spec: ServiceSpec, host_port: int, data_dir: Path) -> Handle:
        data_dir.mkdir(parents=True, exist_ok=True)
        name = self.container_name(spec.name)
        self._remove(name)
        host_net = self.network == "host"
        inner = host_port if host_net else spec.port
        # Behind a bridge the container's own loopback is unreachable from the published port:
        # the service listens on every address of its namespace, published on the host's loopback.
        listen = "127.0.0.1" if host_net else "0.0.0.0"

        def fill(text: str) -> str:
            return expand(
                text, port=inner, data_dir=Path("/data"), gpu_share=spec.gpu_share, host=listen
            )

        kwargs: dict[str, Any] = {
            "name": name,
            "detach": True,
            "labels": {
                LABEL_MANAGED: "true",
                LABEL_AGENT: self.agent_key,
                LABEL_SERVICE: spec.name,
                "rma.port": str(host_port),
            },
            "environment": {k: fill(v) for k, v in spec.env.items()},
        }
        if spec.args:
            kwargs["command"] = [fill(a) for a in spec.args]
        if host_net:
            kwargs["network_mode"] = "host"
        else:
            kwargs["ports"] = {f"{spec.port}/tcp": (self.bind_host, host_port)}
        memory_mb = _capped(spec.resources.memory_mb or None, self.limits.memory_mb)
        if memory_mb:
            kwargs["mem_limit"] = f"{int(memory_mb)}m"
        cpus = _capped(spec.resources.cpu_cores or None, self.limits.cpu)
        if cpus:
            kwargs["nano_cpus"] = int(cpus * 1e9)
        if spec.gpu_devices:  # the GPU(s) the coordinator placed it on
            ids = [str(i) for i in spec.gpu_devices]
            kwargs["device_requests"] = [DeviceRequest(device_ids=ids, capabilities=[["gpu"]])]
        elif spec.gpu:
            kwargs["device_requests"] = [DeviceRequest(count=-1, capabilities=[["gpu"]])]
        # {data_dir} is /data inside the container: the service's own folder on the host
        volumes = {vol: {"bind": path, "mode": "rw"} for path, vol in spec.volumes.items()}
        if "/data" not in spec.volumes:
            volumes[str(data_dir.absolute())] = {"bind": "/data", "mode": "rw"}
        kwargs["volumes"] = volumes
        try:
            container = self.client.containers.run(self.image(spec), **kwargs)
        except ImageNotFound as exc:
            raise RuntimeFailure(f"image {self.image(spec)} is missing: {_explain(exc)}") from None
        except APIError as exc:
            if exc.is_client_error():
                raise RuntimeFailure(f"cannot create the container: {_explain(exc)}") from None
            raise
        return Handle(spec.name, host_port, str(container.id)[:12], container)

    def inside(self, handle: Handle, spec: ServiceSpec) -> Inside | None:
        """A data service's backup tools run in its container (the engine's exec API): the
        image has them (``postgres:16`` has ``pg_dumpall`` and ``psql``), the host may not."""
        container = handle.detail
        if container is None or "/data" in spec.volumes:  # /data is not the host's folder
            return None

        async def run(argv: list[str], env: dict[str, str]) -> tuple[int, str]:
            def call() -> tuple[int, str]:
                result = container.exec_run(argv, environment=env, stdout=True, stderr=True)
                raw = result.output or b""
                code = -1 if result.exit_code is None else int(result.exit_code)
                return code, raw.decode("utf-8", "replace")

            return await asyncio.to_thread(call)

        port = handle.host_port if self.network == "host" or not spec.port else spec.port
        return Inside(run, port, "/data")

    async def exit_status(self, handle: Handle) -> str | None:
        container = handle.detail

        def check() -> str | None:
            try:
                container.reload()
            except NotFound:
                return "its container disappeared"
            if container.status in ("exited", "dead"):
                code = container.attrs.get("State", {}).get("ExitCode")
                return f"exited with code {code}"
            return None

        return await asyncio.to_thread(check)

    async def stop(self, service: str, handle: Handle | None, *, grace: float) -> None:
        name = self.container_name(service)

        def stop() -> None:
            try:
                container = self.client.containers.get(name)
            except NotFound:
                return
            if grace > 0:
                with contextlib.suppress(NotFound, APIError):
                    container.stop(timeout=int(max(grace, 1)))
            self._remove(name)

        await asyncio.to_thread(stop)

    def _remove(self, name: str) -> None:
        try:
            self.client.containers.get(name).remove(force=True)
        except NotFound:
            return
        except APIError as exc:
            if exc.status_code != 409:  # 409: removal already in progress
                raise

    async def cleanup(self) -> list[str]:
        def clean() -> list[str]:
            gone: list[str] = []
            found = self.client.containers.list(
                all=True, filters={"label": [f"{LABEL_AGENT}={self.agent_key}"]}
            )
            for c in found:
                with contextlib.suppress(NotFound):
                    c.remove(force=True)
                    gone.append(f"{c.labels.get(LABEL_SERVICE, '?')} (container {c.name})")
            return gone

        return await asyncio.to_thread(clean)

    def log_tail(self, handle: Handle, lines: int = 5) -> str:
        try:
            raw = handle.detail.logs(tail=lines)
        except (DockerException, OSError):
            return ""
        text = raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)
        return " | ".join(ln for ln in text.splitlines() if ln.strip())

    async def aclose(self) -> None:
        await asyncio.to_thread(self.client.close)

    def enforced(self) -> dict[str, str]:
        """How each donor limit is applied to this runtime's containers."""
        out: dict[str, str] = {}
        if self.limits.cpu is not None:
            out["cpu"] = f"nano_cpus: at most {self.limits.cpu:g} CPUs per container"
        if self.limits.memory_mb is not None:
            out["memory"] = f"mem_limit: at most {self.limits.memory_mb} MB per container"
        if self.limits.vram_mb is not None:
            out["vram"] = "planned only (the coordinator and the agent keep services within it)"
        return out

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "engine": self.version,
            "network": self.network,
            "limits": self.enforced(),
        }


def _capped(wanted: float | None, cap: float | None) -> float | None:
    """The service's own limit, never above the donor's (the donor's when it declares none)."""
    if cap is None:
        return wanted
    return cap if wanted is None else min(wanted, cap)
