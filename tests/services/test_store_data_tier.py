"""rag and notes keep their stores in the data tier, for real: a coordinator, a data worker that
runs the system's PostgreSQL on the process runtime, and a service worker that runs rag, notes
and a model-free embeddings backend. Documents and notes added through the gateway are rows in
the data tier's PostgreSQL (read back through ``rma connect``), search through the gateway finds
them, and a new service worker with an empty folder serves the same documents.

Skips (a failure under ``RMA_REQUIRE_ALL=1``) when initdb or psycopg is not installed.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from tests.chaos.harness import kill_machine

from rma.agent.programs import find_program

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
BACKEND = Path(__file__).with_name("hash_embed_backend.py")


def _root_conftest() -> Any:
    spec = importlib.util.spec_from_file_location(
        "_rma_store_root_conftest", ROOT / "tests/conftest.py"
    )
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


start_coordinator = _root_conftest().start_coordinator


def catalog_text() -> str:
    """postgres, rag, notes and the hash embeddings; every other built-in service never runs."""
    from rma.catalog import load_catalog

    keep = ("postgres", "rag", "notes")
    never = [
        f'[services.{name}]\nlabels = {{ rma_test_never = "1" }}\n'
        for name in load_catalog()
        if name not in keep
    ]
    env = 'RMA_EMBEDDING_MODEL = "hash-embed"\nRMA_SERVICE_STORE_RETRY = "1"\n'
    return "\n".join(
        [
            *never,
            f"[services.rag.env]\n{env}",
            f"[services.notes.env]\n{env}",
            "[services.hashembed]",
            'description = "model-free embeddings for tests"',
            "tier = 3",
            'kind = "openai"',
            'models = ["hash-embed"]',
            f'command = ["{{python}}", "{BACKEND}", "--port", "{{port}}"]',
            'health = "/health"',
        ]
    )


def start_agent(url: str, token: str, catalog: Path, tmp: Path, name: str, services: str) -> Any:
    args = ["--coordinator", url, "--token", token, "--name", name, "--services", services]
    args += ["--transport", "tunnel", "--runtime", "process", "--catalog", str(catalog)]
    args += ["--data-dir", str(tmp / name)]
    with open(tmp / f"{name}.log", "ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "rma", "worker", "join", *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "RMA_HEARTBEAT_INTERVAL": "1"},
        )


def wait_for(what: str, cond: Callable[[], Any], timeout: float, logs: list[Path]) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            got = cond()
        except (httpx.HTTPError, ValueError, KeyError):
            got = None
        if got:
            return got
        if time.monotonic() > deadline:
            tails = {p.name: p.read_text()[-3000:] for p in logs if p.exists()}
            pytest.fail(f"{what} did not happen within {timeout:g} s: {tails}")
        time.sleep(0.3)


def healthy_on(admin: httpx.Client, worker: str, *services: str) -> bool:
    for w in admin.get("/api/admin/workers").json():
        if w["name"] == worker and w["status"] == "online":
            ok = {s["name"] for s in w["services"] if s["healthy"]}
            return set(services) <= ok
    return False


def store_of(gw: httpx.Client, service: str) -> dict[str, Any]:
    r = gw.get(f"/api/services/{service}/health")
    return dict(r.json()["store"]) if r.status_code == 200 else {}


class Connect:
    """A real ``rma connect postgres --json`` and its connection string."""

    def __init__(self, url: str, key: str, log: Path) -> None:
        cmd = [sys.executable, "-m", "rma", "connect", "postgres", "--json"]
        with open(log, "ab") as err:
            self.proc = subprocess.Popen(
                [*cmd, "--coordinator", url, "--api-key", key], stdout=subprocess.PIPE, stderr=err
            )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(10)
            pytest.fail(f"rma connect postgres printed nothing: {log.read_text()}")
        self.url = str(json.loads(line)["url"])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


LISBON = "The headquarters of Zorblax Robotics is in Lisbon, Portugal."
BREAD = "Sourdough bread needs a starter, flour, water and salt."


def test_rag_and_notes_keep_their_stores_in_the_data_tier(
    tmp_path: Path, database_url: str
) -> None:
    if find_program("initdb") is None:
        pytest.skip("PostgreSQL's initdb is not installed (apt-get install postgresql)")
    psycopg = pytest.importorskip(
        "psycopg", reason="psycopg missing: pip install 'rma-pool[postgres]'"
    )
    catalog = tmp_path / "catalog.toml"
    catalog.write_text(catalog_text())
    coord = start_coordinator(
        tmp_path / "coord",
        database_url=None if database_url.startswith("sqlite") else database_url,
        extra_args=["--catalog", str(catalog)],
        env={"RMA_HEARTBEAT_INTERVAL": "1"},
    )
    agents: dict[str, subprocess.Popen[bytes]] = {}
    connect: Connect | None = None
    logs = [tmp_path / f"{n}.log" for n in ("data-a", "svc-a", "svc-b")]
    logs += [
        tmp_path / n / "logs" / f"{s}.log" for n in ("svc-a", "svc-b") for s in ("rag", "notes")
    ]
    try:
        with coord.admin() as admin:
            key = admin.post("/api/admin/keys", json={"name": "app", "rpm": 0}).json()["key"]
            auth = {"authorization": f"Bearer {key}"}
            r = admin.post("/api/admin/keys", json={"name": "db", "services": ["postgres"]})
            data_key = r.json()["key"]
            token = coord.token()
            # the service worker first: with no data service yet, rag keeps its own folder
            agents["svc-a"] = start_agent(
                coord.url, token, catalog, tmp_path, "svc-a", "rag,notes,hashembed"
            )
            services = ("rag", "notes", "hashembed")
            wait_for("svc-a healthy", lambda: healthy_on(admin, "svc-a", *services), 180, logs)
            with httpx.Client(base_url=coord.url, headers=auth, timeout=60) as gw:
                early = wait_for(
                    "rag's store chosen",
                    lambda: (
                        (st := store_of(gw, "rag")).get("kind") not in (None, "choosing") and st
                    ),
                    60,
                    logs,
                )
                assert early["kind"] == "local"
                assert "no_worker" in early["reason"]
                body = {"id": "early", "title": "Early", "text": "Written before the data tier."}
                r = gw.post("/api/services/rag/documents", json=body)
                assert r.status_code == 201, r.text
            agents["data-a"] = start_agent(
                coord.url, token, catalog, tmp_path, "data-a", "postgres"
            )
            wait_for("postgres healthy", lambda: healthy_on(admin, "data-a", "postgres"), 180, logs)
            # the worker's service key reaches every HTTP service and, of the data tier, postgres
            keys = admin.get("/api/admin/keys").json()
            scoped = [k["services"] for k in keys if k["name"].startswith("worker services ")]
            assert ["*", "postgres"] in scoped

        with httpx.Client(base_url=coord.url, headers=auth, timeout=60) as gw:
            for service in ("rag", "notes"):
                store = wait_for(
                    f"{service} on the data tier",
                    lambda s=service: (st := store_of(gw, s)).get("kind") == "postgres" and st,
                    60,
                    logs,
                )
                assert store["data_service"] == "postgres"
                assert store["worker"] == "data-a"
                assert store["schema"] == f"rma_{service}"
                assert store["vectors"] in ("vector", "real[]")
                assert "***" in store["dsn"]  # never the password
                # what rag wrote to its folder meanwhile was handed up
                assert store.get("handed_up") == (1 if service == "rag" else None)
            for doc_id, title, text in (("lisbon", "Zorblax", LISBON), ("bread", "Bread", BREAD)):
                r = gw.post(
                    "/api/services/rag/documents", json={"id": doc_id, "title": title, "text": text}
                )
                assert r.status_code == 201, r.text
            r = gw.post(
                "/api/services/notes/notes",
                json={"text": "Call the plumber about the sink", "tags": ["home"]},
            )
            assert r.status_code == 201, r.text
            note_id = r.json()["id"]
            hits = gw.post(
                "/api/services/rag/search", json={"query": "Where is Zorblax Robotics?", "top_k": 2}
            )
            assert hits.status_code == 200, hits.text
            assert hits.json()["results"][0]["document_id"] == "lisbon"
            found = gw.post(
                "/api/services/notes/search", json={"query": "plumber sink", "tag": "home"}
            )
            assert [h["note"]["id"] for h in found.json()["results"]] == [note_id]

        # the rows are in the data tier's PostgreSQL, read through rma connect
        connect = Connect(coord.url, data_key, tmp_path / "connect.log")
        with psycopg.connect(connect.url, connect_timeout=20) as conn:
            docs = conn.execute("SELECT id, title FROM rma_rag.documents ORDER BY id").fetchall()
            assert docs == [("bread", "Bread"), ("early", "Early"), ("lisbon", "Zorblax")]
            chunks = conn.execute("SELECT text FROM rma_rag.chunks WHERE document_id = 'lisbon'")
            assert chunks.fetchall() == [(LISBON,)]
            notes = conn.execute("SELECT id, tags FROM rma_notes.notes").fetchall()
            assert notes == [(note_id, ["home"])]

        (left,) = (tmp_path / "svc-a").rglob("rag.sqlite3")  # handed up: nothing left in it
        with contextlib.closing(sqlite3.connect(left)) as db:
            assert db.execute("SELECT count(*) FROM documents").fetchone() == (0,)

        # the service worker goes; a new one, with an empty folder, serves the same store
        agents["svc-a"].terminate()
        agents["svc-a"].wait(90)
        with coord.admin() as admin:
            agents["svc-b"] = start_agent(
                coord.url, coord.token(), catalog, tmp_path, "svc-b", "rag,notes,hashembed"
            )
            wait_for("svc-b healthy", lambda: healthy_on(admin, "svc-b", *services), 180, logs)
        with httpx.Client(base_url=coord.url, headers=auth, timeout=60) as gw:
            for service in ("rag", "notes"):
                wait_for(
                    f"{service} on svc-b on the data tier",
                    lambda s=service: store_of(gw, s).get("kind") == "postgres",
                    60,
                    logs,
                )
            listed = gw.get("/api/services/rag/documents").json()["documents"]
            assert sorted(d["id"] for d in listed) == ["bread", "early", "lisbon"]
            hits = gw.post(
                "/api/services/rag/search", json={"query": "Zorblax headquarters", "top_k": 1}
            )
            assert hits.json()["results"][0]["document_id"] == "lisbon"
            assert [n["id"] for n in gw.get("/api/services/notes/notes").json()["notes"]] == [
                note_id
            ]
            assert not list((tmp_path / "svc-b").rglob("rag.sqlite3"))  # nothing in its folder

            # the data worker dies: 503s (rag's own store_unavailable, which the gateway passes on
            # as upstream_unavailable), never a traceback, never a split local store
            kill_machine(agents.pop("data-a"))

            def refused() -> bool:
                r = gw.get("/api/services/rag/documents")
                codes = ("store_unavailable", "upstream_unavailable")
                return r.status_code == 503 and r.json()["error"]["code"] in codes

            wait_for("rag answering 503", refused, 60, logs)
            store = wait_for(
                "rag's health saying why",
                lambda: (st := store_of(gw, "rag")).get("ok") is False and st,
                60,
                logs,
            )
            assert store["kind"] == "postgres"
            assert store["error"]
            assert not list((tmp_path / "svc-b").rglob("rag.sqlite3"))
    finally:
        if connect is not None:
            connect.stop()
        for proc in agents.values():
            kill_machine(proc)
        coord.stop()
