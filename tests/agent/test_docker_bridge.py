"""The docker runtime under a bridge network: what it asks the engine for.

The engine here runs with ``--bridge=none`` (host networking only, as this machine allows), so a
bridge network cannot exist: a client that records the container it is asked to create stands in
for the engine, and nothing else is faked. The real engine's host-networking path is tested in
test_docker_runtime.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from rma.catalog import load_catalog
from rma.schemas.api import ServiceSpec

pytest.importorskip("docker", reason="docker SDK missing: pip install 'rma-pool[docker]'")


class RecordingClient:
    """The calls DockerRuntime makes to create a container, recorded; a bridge network exists."""

    def __init__(self) -> None:
        self.created: list[tuple[str, dict[str, Any]]] = []
        self.networks = self
        self.containers = self

    def list(self, **_: Any) -> list[str]:
        return ["bridge"]

    def version(self) -> dict[str, str]:
        return {"Version": "recorded"}

    def get(self, name: str) -> Any:
        from docker.errors import NotFound

        raise NotFound(name)

    def run(self, image: str, **kwargs: Any) -> Any:
        self.created.append((image, kwargs))

        class Container:
            id = "0123456789abcdef"

        return Container()


def started(spec: ServiceSpec, tmp_path: Path) -> dict[str, Any]:
    from rma.agent.runtimes.docker import DockerRuntime

    client = RecordingClient()
    runtime = DockerRuntime(client, tmp_path, agent_key="k")
    assert runtime.network == "bridge"
    runtime._start(spec, 43210, tmp_path / "data")
    ((_, kwargs),) = client.created
    return kwargs


@pytest.mark.parametrize("name", ["redis", "chromadb", "postgres", "ollama", "vllm", "llm"])
def test_upstream_images_listen_where_the_published_port_reaches(name: str, tmp_path: Path) -> None:
    """Inside a bridge container 127.0.0.1 is the container's own loopback: a published port
    cannot reach a service bound there. The catalog's `{host}` is 0.0.0.0 there, and the port is
    published on the host's loopback only."""
    kwargs = started(load_catalog()[name], tmp_path)
    said = " ".join(kwargs.get("command", [])) + " " + " ".join(kwargs["environment"].values())
    assert "0.0.0.0" in said and "127.0.0.1" not in said, said
    spec = load_catalog()[name]
    assert kwargs["ports"] == {f"{spec.port}/tcp": ("127.0.0.1", 43210)}
    assert "network_mode" not in kwargs


def test_every_builtin_image_entry_binds_the_placeholder() -> None:
    """No built-in container hard-codes a listen address: each says `{host}` (or needs none)."""
    for spec in load_catalog().values():
        if not spec.image:
            continue
        said = " ".join(spec.args) + " " + " ".join(spec.env.values())
        assert "127.0.0.1" not in said and "0.0.0.0" not in said, (spec.name, said)
