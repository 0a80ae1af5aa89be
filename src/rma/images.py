"""The built-in services' container images: their names, where they come from, how to build them.

The catalog names them ``rma/<service>:latest``. Nothing is published under that name: an agent
either finds the image built locally (``rma service build NAME``) or, with ``RMA_IMAGE_PREFIX``
set, pulls ``<prefix><service>:latest`` from the operator's registry instead (the prefix
replaces the leading ``rma/``: ``ghcr.io/acme/rma-`` gives ``ghcr.io/acme/rma-llm:latest``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from importlib import resources
from pathlib import Path
from typing import Any

from rma import __version__

#: The namespace of the built-in services' images in the catalog.
NAMESPACE = "rma/"


def resolve(image: str, prefix: str = "") -> str:
    """The image to run for the catalog's ``image``: a built-in one under ``prefix`` if set."""
    if prefix and image.startswith(NAMESPACE):
        return prefix + image[len(NAMESPACE) :]
    return image


def builtin_tag(service: str) -> str:
    return f"{NAMESPACE}{service}:latest"


def checkout_root() -> Path | None:
    """The source checkout this package runs from (``pip install -e``), if it is one."""
    root = Path(__file__).resolve().parents[2]
    if (root / "pyproject.toml").is_file() and (root / "src" / "rma").is_dir():
        return root
    return None


@contextmanager
def build_context() -> Iterator[tuple[Path, str]]:
    """A folder to build from and the Dockerfile in it: the checkout's, else the package's own
    (which installs this version of rma-pool from the package index)."""
    root = checkout_root()
    if root is not None and (root / "containers" / "service.Dockerfile").is_file():
        yield root, "containers/service.Dockerfile"
        return
    with resources.as_file(resources.files("rma").joinpath("service.Dockerfile")) as dockerfile:
        yield dockerfile.parent, dockerfile.name


class BuildFailed(Exception):
    """The engine could not build the image; the message is its last words."""


def build(
    client: Any,
    service: str,
    *,
    tag: str | None = None,
    report: Callable[[str], None],
    context: tuple[Path, str] | None = None,
) -> str:
    """Build ``service``'s image on ``client`` (a docker SDK client); return its tag.

    ``report`` gets each line of the build's output as it comes; ``context`` (a folder and the
    Dockerfile in it) replaces :func:`build_context`'s.
    """
    tag = tag or builtin_tag(service)
    with build_context() if context is None else nullcontext(context) as (folder, dockerfile):
        stream = client.api.build(
            path=str(folder),
            dockerfile=dockerfile,
            tag=tag,
            buildargs={"SERVICE": service, "VERSION": __version__},
            rm=True,
            decode=True,
            network_mode="host",
        )
        for event in stream:
            if "error" in event:
                raise BuildFailed(str(event["error"]).strip())
            line = str(event.get("stream", "")).rstrip()
            if line:
                report(line)
    return tag


_STEP = re.compile(r"^Step (\d+)/(\d+) : (.*)$")


def build_image(client: Any, service: str, *, tag: str | None = None, quiet: bool = False) -> str:
    """:func:`build` with a progress bar on stderr: the Dockerfile's steps, and the current one."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, disable=quiet, transient=False) as progress:
        task = progress.add_task(f"building {tag or builtin_tag(service)}", total=None)

        def report(line: str) -> None:
            step = _STEP.match(line)
            if step:
                done, total, what = int(step[1]), int(step[2]), step[3]
                progress.update(task, completed=done - 1, total=total, description=what[:60])

        built = build(client, service, tag=tag, report=report)
        progress.update(task, completed=1, total=1, description=f"built {built}")
    return built
