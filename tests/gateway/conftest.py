"""Fixtures for the gateway: real fake-backend processes, a real coordinator, workers over HTTP.

The backend is ``bench/fake_backend.py``, a real OpenAI-compatible HTTP server in its own process
that can be told to be slow, stall or die on cue (a model cannot), and answers hundreds of
requests a second; everything between the client and it is the real product. The real models
behind the same gateway are tested in ``tests/test_up.py`` and ``tests/services``.
"""

from __future__ import annotations

import importlib.util
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
FAKE_BACKEND = ROOT / "bench" / "fake_backend.py"


def _root_conftest() -> Any:
    """``tests/conftest.py`` as a module (its helpers: ``start_coordinator``, ``free_port``)."""
    spec = importlib.util.spec_from_file_location("_rma_root_conftest", ROOT / "tests/conftest.py")
    assert spec
    assert spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


_root = _root_conftest()
free_port: Callable[[], int] = _root.free_port
start_coordinator = _root.start_coordinator

CATALOG = f"""
[services.fake]
description = "fake OpenAI backend for tests"
tier = 3
kind = "openai"
models = ["fake-model", "fake-embed"]
command = ["{{python}}", "{FAKE_BACKEND}", "--port", "{{port}}", "--delay", "0.03"]
health = "/health"
replicas = 16  # a lower tier than the machine's is only added while short of replicas

[services.echo]
description = "a plain HTTP service (the fake backend's /echo)"
tier = 3
kind = "http"
command = ["{{python}}", "{FAKE_BACKEND}", "--port", "{{port}}"]
health = "/health"
"""

CAPS = {"cpu_cores": 2, "memory_mb": 4096, "disk_free_mb": 10000, "os": "linux", "arch": "x86_64"}


@dataclass
class Backend:
    """A fake OpenAI backend process."""

    name: str
    port: int
    proc: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(10)


def start_backend(name: str, *args: str, port: int | None = None) -> Backend:
    port = port or free_port()
    cmd = [sys.executable, str(FAKE_BACKEND), "--port", str(port), "--name", name, *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/health"
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"fake backend {name} exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return Backend(name, port, proc)
        except httpx.HTTPError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"fake backend {name} did not start")


@pytest.fixture
def backends() -> Iterator[Callable[..., Backend]]:
    """Start fake backends: ``backends("a", "--delay", "0.05")``; all are killed afterwards."""
    started: list[Backend] = []

    def start(name: str, *args: str) -> Backend:
        b = start_backend(name, *args)
        started.append(b)
        return b

    yield start
    for b in started:
        b.kill(signal.SIGKILL)


@dataclass
class Pool:
    """A real coordinator with the test catalog, and helpers to act as workers over HTTP."""

    coord: Any
    api_key: str
    catalog: Path
    workers: dict[str, tuple[str, str]] = field(default_factory=dict)  # name -> (id, credential)

    @property
    def url(self) -> str:
        return str(self.coord.url)

    def client(self, key: str | None = None, **kw: Any) -> httpx.Client:
        headers = {"authorization": f"Bearer {key or self.api_key}"}
        return httpx.Client(base_url=self.url, headers=headers, timeout=kw.pop("timeout", 30), **kw)

    def create_key(self, rpm: int = 0, name: str = "test") -> str:
        with self.coord.admin() as c:
            r = c.post("/api/admin/keys", json={"name": name, "rpm": rpm})
            r.raise_for_status()
            return str(r.json()["key"])

    def add_worker(self, name: str, endpoints: dict[str, str], owner: str = "") -> str:
        """Register a direct worker and report ``endpoints`` (service -> URL) healthy."""
        token = self.coord.token()
        body = {
            "token": token,
            "name": name,
            "capabilities": CAPS,
            "transport": "direct",
            "runnable": list(endpoints),
            "owner": owner,
        }
        r = httpx.post(self.url + "/api/worker/register", json=body, timeout=10)
        assert r.status_code == 201, r.text
        data = r.json()
        self.workers[name] = (data["worker_id"], data["credential"])
        self.heartbeat(name, endpoints)
        return str(data["worker_id"])

    def heartbeat(
        self, name: str, endpoints: dict[str, str], healthy: bool = True, draining: bool = False
    ) -> None:
        _, credential = self.workers[name]
        services = [
            {"name": s, "state": "running", "healthy": healthy, "endpoint": url}
            for s, url in endpoints.items()
        ]
        r = httpx.post(
            self.url + "/api/worker/heartbeat",
            json={"services": services, "draining": draining},
            headers={"authorization": f"Bearer {credential}"},
            timeout=10,
        )
        assert r.status_code == 200, r.text


def only_test_services_catalog() -> str:
    """The test catalog, plus overrides that keep every built-in service off the workers."""
    from rma.catalog import load_catalog

    never = [
        f'[services.{name}]\nlabels = {{ rma_test_never = "1" }}\n'
        for name in load_catalog()
        if name not in ("fake", "echo")
    ]
    return CATALOG + "\n" + "\n".join(never)


def make_pool(
    tmp_path: Path,
    database_url: str,
    env: dict[str, str] | None = None,
    catalog_text: str = CATALOG,
) -> Pool:
    tmp_path.mkdir(parents=True, exist_ok=True)
    catalog = tmp_path / "catalog.toml"
    catalog.write_text(catalog_text)
    full_env = {
        "RMA_STALL_TIMEOUT": "2",
        "RMA_FIRST_BYTE_TIMEOUT": "10",
        "RMA_CONNECT_TIMEOUT": "2",
        **(env or {}),
    }
    coord = start_coordinator(
        tmp_path / "coord",
        database_url=None if database_url.startswith("sqlite") else database_url,
        extra_args=["--catalog", str(catalog)],
        env=full_env,
    )
    with coord.admin() as c:
        r = c.post("/api/admin/keys", json={"name": "tests", "rpm": 0})
        r.raise_for_status()
        key = r.json()["key"]
    return Pool(coord, key, catalog)


@pytest.fixture
def pool_factory(tmp_path: Path, database_url: str) -> Iterator[Callable[..., Pool]]:
    """``pool_factory(env={...})``: a coordinator with the test catalog; stopped afterwards.

    ``catalog`` on the pool is the catalog file (pass it to agents with ``--catalog``).
    """
    made: list[Pool] = []

    def make(env: dict[str, str] | None = None, catalog_text: str = CATALOG) -> Pool:
        p = make_pool(tmp_path / f"pool{len(made)}", database_url, env, catalog_text)
        made.append(p)
        return p

    yield make
    for p in made:
        p.coord.stop()


@pytest.fixture
def pool(pool_factory: Callable[..., Pool]) -> Pool:
    return pool_factory()


@pytest.fixture
def test_services_catalog() -> str:
    """Catalog text for pools with real agents: only the test services get assigned."""
    return only_test_services_catalog()
