"""`rma service build` and the image prefix, against a real Docker engine (nothing can be pulled
here: the builds start from the local test image, and the real Dockerfile's failure to pull its
base is the error path)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from tests.agent.conftest import TEST_IMAGE, docker_client

from rma.images import BuildFailed, build, resolve

pytestmark = [pytest.mark.docker]


@pytest.fixture
def engine() -> Any:
    client = docker_client()
    yield client
    client.close()


def test_the_prefix_replaces_only_the_builtin_namespace() -> None:
    assert resolve("rma/llm:latest", "ghcr.io/acme/rma-") == "ghcr.io/acme/rma-llm:latest"
    assert resolve("rma/llm:latest", "") == "rma/llm:latest"
    assert resolve("redis:7", "ghcr.io/acme/") == "redis:7"
    assert resolve("rmaster/x:1", "ghcr.io/acme/") == "rmaster/x:1"


def test_build_tags_the_image_and_reports_each_step(engine: Any, tmp_path: Path) -> None:
    (tmp_path / "Dockerfile").write_text(
        f"FROM {TEST_IMAGE}\nARG SERVICE\nARG VERSION\n"
        'LABEL rma.built-for="${SERVICE}" rma.version="${VERSION}"\n'
    )
    tag = "rma-test/built-web:1"
    lines: list[str] = []
    try:
        assert build(engine, "web", tag=tag, report=lines.append, context=(tmp_path, "Dockerfile"))
        labels = engine.images.get(tag).labels
        from rma import __version__

        assert labels["rma.built-for"] == "web" and labels["rma.version"] == __version__
        assert any(line.startswith("Step 1/") for line in lines), lines
    finally:
        engine.images.remove(tag, force=True)


def test_a_failing_step_is_the_engines_own_words(engine: Any, tmp_path: Path) -> None:
    (tmp_path / "Dockerfile").write_text(f"FROM {TEST_IMAGE}\nRUN /bin/busybox false\n")
    with pytest.raises(BuildFailed, match="returned a non-zero code"):
        build(engine, "web", tag="rma-test/never:1", report=lambda _: None,
              context=(tmp_path, "Dockerfile"))  # fmt: skip
    names = [t for image in engine.images.list() for t in image.tags]
    assert "rma-test/never:1" not in names


def rma(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rma", *args], capture_output=True, text=True, timeout=300
    )


def test_cli_build_without_its_base_image_is_one_error_line(engine: Any) -> None:
    """The checkout's own service.Dockerfile: its base cannot be pulled here, which the CLI says
    in one line, tagging nothing."""
    done = rma("service", "build", "notes", "--tag", "rma-test/no-base:1")
    assert done.returncode == 1, (done.stdout, done.stderr)
    lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
    assert lines[-1].startswith("error: cannot build rma-test/no-base:1"), done.stderr
    assert "Traceback" not in done.stderr
    names = [t for image in engine.images.list() for t in image.tags]
    assert "rma-test/no-base:1" not in names


def test_cli_build_of_an_unknown_service_changes_nothing() -> None:
    done = rma("service", "build", "nope")
    assert done.returncode == 2
    assert done.stderr.startswith("error: no built-in service 'nope'"), done.stderr
