"""Shared fixtures: isolated settings, the app in-process, a real coordinator process.

Set ``RMA_TEST_DATABASE_URL`` (e.g. ``postgresql+psycopg://postgres@127.0.0.1/rma_test``) to run
every database test against PostgreSQL instead of SQLite; CI does.
"""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

TEST_DB_URL = os.environ.get("RMA_TEST_DATABASE_URL")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def reset_database(url: str) -> None:
    """Empty the test database (PostgreSQL): every test starts from a fresh schema.

    Connections left by an earlier test (a coordinator process that is still exiting, say) would
    hold locks that deadlock ``DROP SCHEMA``: they are terminated first, and a deadlock or lock
    timeout is retried a few times before the test errors.
    """
    from sqlalchemy import text
    from sqlalchemy.exc import DBAPIError

    from rma.coordinator.db import make_engine

    engine = make_engine(url)
    try:
        for attempt in range(5):
            try:
                with engine.begin() as conn:
                    conn.execute(
                        text(
                            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                        )
                    )
                    conn.execute(text("SET LOCAL lock_timeout = '10s'"))
                    conn.execute(text("DROP SCHEMA IF EXISTS public CASCADE"))
                    conn.execute(text("CREATE SCHEMA public"))
                return
            except DBAPIError:
                if attempt == 4:
                    raise
                time.sleep(0.2 * (attempt + 1))
    finally:
        engine.dispose()


#: Every engine that connected since the last test ended, by id (strong references: an engine
#: that became garbage in the middle of a test would otherwise take its open connections with it,
#: and they would warn later, in another test, when collected).
_engines: dict[int, Any] = {}


def _track_engines() -> None:
    """Remember every SQLAlchemy engine that connects, so each test can dispose of it."""
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    if not event.contains(Engine, "engine_connect", _remember_engine):
        event.listen(Engine, "engine_connect", _remember_engine)


def _remember_engine(conn: Any) -> None:
    _engines[id(conn.engine)] = conn.engine


def _dispose_engines() -> None:
    while _engines:
        _, engine = _engines.popitem()
        engine.dispose()


@pytest.fixture(autouse=True)
def _close_engines() -> Iterator[None]:
    """No database connection outlives the test that opened it (a leaked one would hold locks on
    the shared PostgreSQL database, or warn later, in another test, when it is collected).  An
    engine a longer-lived fixture shares is disposed too: it simply connects again when used."""
    _track_engines()
    yield
    _dispose_engines()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    _dispose_engines()


@pytest.fixture(autouse=True)
def _isolate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No test reads the developer's real config, data dir or keys."""
    for var in list(os.environ):
        if var.startswith("RMA_") and var != "RMA_TEST_DATABASE_URL":
            monkeypatch.delenv(var)
    monkeypatch.setenv("RMA_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("RMA_CONFIG", str(tmp_path / "no-config.toml"))
    monkeypatch.setenv("NO_COLOR", "1")
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg-config"))


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    if TEST_DB_URL:
        reset_database(TEST_DB_URL)
        return TEST_DB_URL
    return f"sqlite:///{tmp_path / 'data' / 'rma.db'}"


@dataclass
class Coordinator:
    """A real ``rma coordinator serve`` process."""

    url: str
    data_dir: Path
    admin_key: str
    proc: subprocess.Popen[bytes]
    env: dict[str, str] = field(default_factory=dict)
    log: Path | None = None

    def admin(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.url, headers={"authorization": f"Bearer {self.admin_key}"}, timeout=10
        )

    def token(self, uses: int | None = 10, ttl: float = 600) -> str:
        with self.admin() as c:
            r = c.post("/api/admin/tokens", json={"ttl": ttl, "uses": uses, "label": "test"})
            r.raise_for_status()
            return str(r.json()["token"])

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def start_coordinator(
    data_dir: Path,
    *,
    port: int | None = None,
    database_url: str | None = None,
    extra_args: list[str] | None = None,
    env: dict[str, str] | None = None,
    scheme: str = "http",
    verify: bool | str = True,
) -> Coordinator:
    port = port or free_port()
    args = [sys.executable, "-m", "rma", "coordinator", "serve", "--port", str(port)]
    args += ["--data-dir", str(data_dir), "--log-level", "warning"]
    if database_url:
        args += ["--database-url", database_url]
    args += extra_args or []
    full_env = {**os.environ, **(env or {})}
    data_dir.mkdir(parents=True, exist_ok=True)
    log = data_dir.parent / f"coordinator-{port}.log"
    with open(log, "ab") as fh:
        proc = subprocess.Popen(args, env=full_env, stdout=fh, stderr=subprocess.STDOUT)
    url = f"{scheme}://127.0.0.1:{port}"
    ctx = ssl.create_default_context(cafile=verify) if isinstance(verify, str) else verify
    deadline = time.monotonic() + 30
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"coordinator exited with {proc.returncode}:\n{log.read_text()}")
            try:
                if httpx.get(url + "/healthz", timeout=1, verify=ctx).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        else:
            raise RuntimeError(f"coordinator did not start:\n{log.read_text()}")
    except BaseException:
        proc.kill()
        proc.wait(5)
        raise
    key = (data_dir / "admin.key").read_text().strip()
    return Coordinator(url=url, data_dir=data_dir, admin_key=key, proc=proc, env=env or {}, log=log)


@pytest.fixture
def coordinator_process(tmp_path: Path, database_url: str) -> Iterator[Coordinator]:
    """A real coordinator on a free loopback port (SQLite, or PostgreSQL in CI)."""
    coord = start_coordinator(tmp_path / "coord", database_url=database_url)
    yield coord
    coord.stop()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    """Under ``RMA_REQUIRE_ALL=1`` (CI) a skip is a failure: CI provides every service and model."""
    outcome = yield
    report = outcome.get_result()
    if (
        os.environ.get("RMA_REQUIRE_ALL") == "1"
        and report.skipped
        and not hasattr(report, "wasxfail")
    ):
        report.outcome = "failed"
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.longrepr = f"skipped in CI, where nothing may skip: {reason}"


def pytest_report_header(config: pytest.Config) -> str | None:
    seed = os.environ.get("RMA_TEST_SHUFFLE")
    return f"test order shuffled: RMA_TEST_SHUFFLE={seed}" if seed else None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``RMA_TEST_SHUFFLE=SEED`` runs the modules, and the tests in each, in a shuffled order
    (as pytest-randomly does; modules stay whole so module fixtures start once): a test that
    passes only after another one is found this way.  The same seed gives the same order."""
    seed = os.environ.get("RMA_TEST_SHUFFLE")
    if not seed:
        return
    import random

    rng = random.Random(seed)
    modules: dict[str, list[pytest.Item]] = {}
    for item in items:
        modules.setdefault(item.nodeid.split("::", 1)[0], []).append(item)
    order = list(modules)
    rng.shuffle(order)
    shuffled: list[pytest.Item] = []
    for name in order:
        group = modules[name]
        rng.shuffle(group)
        shuffled.extend(group)
    items[:] = shuffled
