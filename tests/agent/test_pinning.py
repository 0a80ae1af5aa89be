"""The coordinator's identity, pinned at join: the join line of ``rma admin tokens create``
carries the SHA-256 of the coordinator's certificate, and the agent (and its tunnel) refuse any
other certificate; plain http:// only to this machine."""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import ssl
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from tests.coordinator.conftest import make_tls_files, start_coordinator

from rma.agent.tunnel import TunnelClient
from rma.client import tls_verify
from rma.pinning import pem_hash

from .conftest import wait_for

pytestmark = pytest.mark.slow


def rma(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rma", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "NO_COLOR": "1", "COLUMNS": "300", **(env or {})},
        check=False,
    )


def local_args(tmp_path: Path, catalog: Path, name: str) -> list[str]:
    return [
        "--data-dir", str(tmp_path / name), "--runtime", "process", "--transport", "direct",
        "--catalog", str(catalog), "--label", "rma.services=echo", "--name", name,
    ]  # fmt: skip


def only_error(res: subprocess.CompletedProcess[str]) -> str:
    """The one ``error:`` line of a failed command (no traceback)."""
    assert res.returncode == 1, res.stderr
    assert "Traceback" not in res.stderr
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, res.stderr
    assert res.stderr.rstrip().endswith(errors[0])
    return errors[0]


@pytest.fixture
def tls_coordinator(tmp_path: Path, database_url: str, echo_catalog: Path) -> Any:
    tls = make_tls_files(tmp_path / "tls")
    coord = start_coordinator(
        tmp_path / "coord",
        database_url=database_url,
        extra_args=[
            "--tls-cert", str(tls.cert), "--tls-key", str(tls.key), "--catalog", str(echo_catalog),
        ],
        env={"RMA_HEARTBEAT_INTERVAL": "1"},
        scheme="https",
        verify=str(tls.ca),
    )  # fmt: skip
    coord.tls = tls
    yield coord
    coord.stop()


def create_token(coord: Any, *extra: str) -> subprocess.CompletedProcess[str]:
    return rma(
        "admin", "tokens", "create", "--uses", "5", "--coordinator", coord.url,
        "--ca-file", str(coord.tls.ca), *extra,
        env={"RMA_DATA_DIR": str(coord.data_dir)},
    )  # fmt: skip


def test_the_join_line_pins_the_certificate_and_joins(
    tmp_path: Path, tls_coordinator: Any, agent_factory: Any, echo_catalog: Path
) -> None:
    coord = tls_coordinator
    res = create_token(coord, "--json")
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    pin = pem_hash(coord.tls.cert.read_text())
    assert doc["ca_hash"] == pin
    assert doc["join_command"] == (
        f"rma worker join --coordinator {coord.url} --token {doc['token']} --ca-hash {pin}"
    )
    # for people: the token alone on stdout (scripts), the ready line on stderr
    human = create_token(coord)
    assert human.returncode == 0, human.stderr
    token = human.stdout.strip()
    assert f"rma worker join --coordinator {coord.url} --token {token} --ca-hash {pin}" in (
        human.stderr
    )

    # the printed line, as pasted (plus where this test keeps things): it joins, without any CA
    argv = shlex.split(doc["join_command"])
    assert argv[:3] == ["rma", "worker", "join"]
    agent_factory(coord.url, *argv[3:], *local_args(tmp_path, echo_catalog, "pinned"))
    ctx = ssl.create_default_context(cafile=str(coord.tls.ca))

    def online() -> bool:
        r = httpx.get(
            f"{coord.url}/api/admin/workers",
            headers={"authorization": f"Bearer {coord.admin_key}"},
            verify=ctx,
            timeout=5,
        )
        return any(
            w["name"] == "pinned" and w["status"] == "online" and w["services"] for w in r.json()
        )

    wait_for(online, 60, every=0.5)
    status = json.loads(
        rma("worker", "status", "--json", "--data-dir", str(tmp_path / "pinned")).stdout
    )
    assert status["pinned"] == pin


def test_a_different_certificate_is_refused(
    tmp_path: Path, tls_coordinator: Any, echo_catalog: Path
) -> None:
    coord = tls_coordinator
    token = json.loads(create_token(coord, "--json").stdout)["token"]
    other = make_tls_files(tmp_path / "impostor")  # the pin the donor was given is another's
    wrong = pem_hash(other.cert.read_text())
    res = rma(
        "worker", "join", "--coordinator", coord.url, "--token", token, "--ca-hash", wrong,
        *local_args(tmp_path, echo_catalog, "fooled"),
    )  # fmt: skip
    line = only_error(res)
    assert "refusing the coordinator" in line
    assert f"not the pinned {wrong}" in line
    assert not (tmp_path / "fooled" / "worker.json").exists()  # it never registered
    # even --insecure does not lift a pin
    res = rma(
        "worker", "join", "--coordinator", coord.url, "--token", token, "--ca-hash", wrong,
        "--insecure", *local_args(tmp_path, echo_catalog, "fooled2"),
    )  # fmt: skip
    assert f"not the pinned {wrong}" in only_error(res)


def test_the_tunnel_client_refuses_a_different_certificate(
    tmp_path: Path, tls_coordinator: Any
) -> None:
    coord = tls_coordinator
    other = make_tls_files(tmp_path / "impostor")

    async def last_error(pin: str) -> str:
        client = TunnelClient(
            coord.url,
            credential=lambda: "not-a-credential",
            endpoints=lambda service: None,
            verify=tls_verify(ca_hash=pin),
        )
        task = asyncio.create_task(client.run())
        try:
            deadline = asyncio.get_running_loop().time() + 30
            while client.last_error is None:
                assert asyncio.get_running_loop().time() < deadline, "no connection attempt"
                await asyncio.sleep(0.05)
            return client.last_error
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    wrong = asyncio.run(last_error(pem_hash(other.cert.read_text())))
    assert wrong.startswith("refusing the coordinator: ")
    assert "not the pinned" in wrong
    # the right pin gets through TLS: it is the coordinator that refuses the made-up credential
    right = asyncio.run(last_error(pem_hash(coord.tls.cert.read_text())))
    assert "HTTP 401" in right, right


def test_plain_http_to_another_machine_is_refused_before_connecting(
    tmp_path: Path, echo_catalog: Path
) -> None:
    # 192.0.2.1 (TEST-NET-1) answers nobody: a connection attempt would hang, not fail like this
    res = rma(
        "worker", "join", "--coordinator", "http://192.0.2.1:8420", "--token", "x",
        *local_args(tmp_path, echo_catalog, "careful"),
    )  # fmt: skip
    line = only_error(res)
    assert "refusing plain http:// to 192.0.2.1" in line
    assert "--insecure" in line
    assert not (tmp_path / "careful").exists()  # nothing was even set up
