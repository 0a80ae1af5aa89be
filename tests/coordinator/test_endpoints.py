"""Service endpoints of direct workers: only on the worker's own address (no SSRF)."""

from __future__ import annotations

import httpx
import pytest

from rma.coordinator.endpoints import endpoint_problem


@pytest.mark.parametrize(
    ("url", "peer", "ok"),
    [
        ("http://127.0.0.1:8000", "127.0.0.1", True),
        ("http://127.0.0.2:8000", "127.0.0.1", True),  # loopback from loopback: same machine
        ("http://[::1]:8000", "127.0.0.1", True),
        ("http://10.0.0.5:8000/v1", "10.0.0.5", True),
        ("https://10.0.0.5", "::ffff:10.0.0.5", True),
        ("http://169.254.169.254/latest/meta-data", "10.0.0.5", False),  # cloud metadata
        ("http://127.0.0.1:8420", "10.0.0.5", False),  # the coordinator's own loopback
        ("http://10.0.0.6:8000", "10.0.0.5", False),  # another host
        ("http://metadata.google.internal", "10.0.0.5", False),  # names could resolve anywhere
        ("file:///etc/passwd", "127.0.0.1", False),
        ("http://user:pw@127.0.0.1:8000", "127.0.0.1", False),
        ("http://127.0.0.1:notaport", "127.0.0.1", False),
    ],
)
def test_endpoint_rules(url: str, peer: str, ok: bool) -> None:
    assert (endpoint_problem(url, peer) is None) is ok


def test_loopback_endpoints_only_when_the_coordinator_is_local() -> None:
    """Listening beyond loopback, a worker seen as 127.0.0.1 (a local proxy) gets nothing local."""
    assert endpoint_problem("http://127.0.0.1:6379", "127.0.0.1", local_only=True) is None
    assert endpoint_problem("http://127.0.0.1:6379", "127.0.0.1", local_only=False) is not None
    assert endpoint_problem("http://169.254.169.254", "169.254.169.254") is not None


def test_trusted_endpoints_accept_names_but_not_other_schemes() -> None:
    assert endpoint_problem("http://gpu-box.lan:8000", "10.0.0.5", trust=True) is None
    assert endpoint_problem("ftp://gpu-box.lan", "10.0.0.5", trust=True) is not None


def test_a_worker_cannot_aim_the_gateway_elsewhere(coordinator_process) -> None:  # type: ignore[no-untyped-def]
    """A real coordinator, a worker on loopback reporting a metadata URL: never routable."""
    url = coordinator_process.url
    caps = {"cpu_cores": 4, "memory_mb": 8192}
    body = {
        "token": coordinator_process.token(),
        "name": "evil",
        "capabilities": caps,
        "transport": "direct",
        "labels": {"rma.services": "llm"},
    }
    reg = httpx.post(url + "/api/worker/register", json=body).json()
    headers = {"authorization": f"Bearer {reg['credential']}"}
    bad = {
        "name": "llm",
        "state": "running",
        "healthy": True,
        "endpoint": "http://169.254.169.254/latest",
    }
    r = httpx.post(url + "/api/worker/heartbeat", json={"services": [bad]}, headers=headers)
    assert r.status_code == 200
    with coordinator_process.admin() as admin:
        worker = admin.get(f"/api/admin/workers/{reg['worker_id']}").json()
    svc = worker["services"][0]
    assert svc["healthy"] is False
    assert "refused" in svc["message"] and "169.254.169.254" in svc["message"]
    # registering with such an advertised endpoint is refused outright, and changes nothing
    body = {**body, "token": coordinator_process.token(), "endpoint": "http://10.9.9.9:80"}
    r = httpx.post(url + "/api/worker/register", json=body)
    assert r.status_code == 422
    assert r.json()["error"]["code"] == "bad_endpoint"
