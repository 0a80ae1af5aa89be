"""The PostgreSQL stores of rag and notes against a real PostgreSQL (``RMA_TEST_DATABASE_URL``),
side by side with the local SQLite stores they stand in for; and a service on each kind.

Skips without ``RMA_TEST_DATABASE_URL`` (e.g. postgresql+psycopg://postgres@127.0.0.1/rma_test).
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

pytest.importorskip(
    "numpy", reason="numpy missing: needs the `local` extra: pip install 'rma-pool[local]'"
)
psycopg = pytest.importorskip("psycopg", reason="psycopg missing: pip install 'rma-pool[postgres]'")

from rma.services import build_app  # noqa: E402
from rma.services import notes as notes_service  # noqa: E402
from rma.services import rag as rag_service  # noqa: E402
from rma.services.store import Document, Note, StoreUnavailable  # noqa: E402
from rma.services.store_local import LocalNotesStore, LocalRagStore  # noqa: E402
from rma.services.store_postgres import (  # noqa: E402
    PORTABLE,
    PostgresNotesStore,
    PostgresRagStore,
    plain_dsn,
    redact,
)

URL = os.environ.get("RMA_TEST_DATABASE_URL", "")


@pytest.fixture
def dsn() -> str:
    if not URL.startswith("postgres"):
        pytest.skip("needs PostgreSQL: set RMA_TEST_DATABASE_URL=postgresql+psycopg://...")
    return plain_dsn(URL)


@pytest.fixture
def schema(dsn: str) -> Iterator[str]:
    """A schema of the test's own, dropped afterwards."""
    name = f"rma_test_{uuid.uuid4().hex[:12]}"
    yield name
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA IF EXISTS {name} CASCADE")


def dead_dsn() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"postgresql://postgres:x@127.0.0.1:{port}/postgres"


def doc(doc_id: str, *chunks: tuple[str, list[float]], created_at: float = 1.0) -> Document:
    text = " ".join(t for t, _ in chunks)
    return Document(doc_id, f"T {doc_id}", {"n": doc_id}, len(text), created_at, list(chunks))


def test_dsn_helpers() -> None:
    assert plain_dsn("postgresql+psycopg://u:p@h:1/d") == "postgresql://u:p@h:1/d"
    assert redact("postgresql://postgres:rma@127.0.0.1:5/postgres") == (
        "postgresql://postgres:***@127.0.0.1:5/postgres"
    )


def test_rag_store_matches_the_local_one(dsn: str, schema: str, tmp_path: Path) -> None:
    pg = PostgresRagStore(dsn, schema)
    local = LocalRagStore(tmp_path)
    try:
        assert pg.db.vectors in ("vector", PORTABLE)
        docs = [
            doc("a", ("east wind", [1.0, 0.0, 0.0]), ("north", [0.0, 3.0, 0.0]), created_at=1),
            doc("b", ("diagonal", [1.0, 1.0, 0.0]), created_at=2),
            doc("c", ("mostly up", [0.1, 0.0, 2.0]), created_at=3),
            doc("odd", ("other model", [1.0, 0.0]), created_at=4),  # other dims: never ranked
        ]
        for store in (pg, local):
            for d in docs:
                stored = store.put_document(d)
                assert stored["id"] == d.id
                assert stored["chunks"] == len(d.chunks)
        assert pg.list_documents() == local.list_documents()
        assert pg.get_document("a") == local.get_document("a")
        assert pg.get_document("nope") is None

        query = [0.9, 0.2, 0.0]
        got = pg.search(query, 3)
        assert [(r["document_id"], r["chunk"]) for r in got] == [("a", 0), ("b", 0), ("a", 1)]
        want = local.search(query, 3)
        assert [r["text"] for r in got] == [r["text"] for r in want]
        for g, w in zip(got, want, strict=True):
            assert g["score"] == pytest.approx(w["score"], abs=1e-5)
            assert g["title"] == w["title"]
        assert len(pg.search(query, 1)) == 1
        assert pg.search([0.0, 0.0, 0.0, 1.0], 5) == []  # no chunk of that size

        # replace: the chunks are the new ones, the old ones gone
        pg.put_document(doc("a", ("only this", [0.0, 0.0, 1.0]), created_at=5))
        assert pg.get_document("a")["chunks"] == 1  # type: ignore[index]
        assert [r["text"] for r in pg.search([0.0, 0.0, 1.0], 1)] == ["only this"]
        assert pg.delete_document("a") is True
        assert pg.delete_document("a") is False
        assert pg.get_document("a") is None
        with psycopg.connect(dsn) as conn:  # the chunks went with it (ON DELETE CASCADE)
            left = conn.execute(f"SELECT count(*) FROM {schema}.chunks WHERE document_id = 'a'")
            assert left.fetchone() == (0,)
    finally:
        pg.close()
        local.close()


def test_rag_hand_up_moves_local_documents(dsn: str, schema: str, tmp_path: Path) -> None:
    pg = PostgresRagStore(dsn, schema)
    local = LocalRagStore(tmp_path)
    try:
        pg.put_document(doc("kept", ("in postgres already", [0.0, 1.0])))
        local.put_document(doc("kept", ("an older local copy", [1.0, 0.0])))
        local.put_document(doc("new", ("written while local", [1.0, 1.0])))
        assert rag_service.hand_up(local, pg) == 1
        assert local.list_documents() == []
        assert [d["id"] for d in pg.list_documents()] == ["kept", "new"]
        assert [r["text"] for r in pg.search([1.0, 1.0], 2)][0] == "written while local"
        assert pg.search([0.0, 1.0], 1)[0]["text"] == "in postgres already"
        exported = pg.export()
        assert [(d.id, [t for t, _ in d.chunks]) for d in exported] == [
            ("kept", ["in postgres already"]),
            ("new", ["written while local"]),
        ]
        assert exported[1].chunks[0][1] == pytest.approx([0.7071068, 0.7071068], abs=1e-6)
    finally:
        pg.close()
        local.close()


def note(note_id: str, vector: list[float], *tags: str, at: float = 1.0) -> Note:
    return Note(note_id, None, f"text {note_id}", list(tags), at, at, vector)


def test_notes_store_matches_the_local_one(dsn: str, schema: str, tmp_path: Path) -> None:
    pg = PostgresNotesStore(dsn, schema)
    local = LocalNotesStore(tmp_path)
    try:
        notes = [
            note("a", [1.0, 0.0], "home", at=1),
            note("b", [0.6, 0.8], "work", "home", at=2),
            note("c", [0.0, 1.0], "work", at=3),
        ]
        for store in (pg, local):
            for n in notes:
                store.put_note(n)
        assert [n.id for n in pg.list_notes(None, 10)] == ["c", "b", "a"]
        assert [n.id for n in pg.list_notes("home", 10)] == ["b", "a"]
        assert [n.id for n in pg.list_notes(None, 2)] == ["c", "b"]
        got = pg.search([1.0, 0.1], 3, None)
        want = local.search([1.0, 0.1], 3, None)
        assert [n.id for n, _ in got] == [n.id for n, _ in want] == ["a", "b", "c"]
        for (_, g), (_, w) in zip(got, want, strict=True):
            assert g == pytest.approx(w, abs=1e-5)
        assert [n.id for n, _ in pg.search([1.0, 0.1], 3, "work")] == ["b", "c"]
        assert pg.get_note("b") is not None
        assert pg.get_note("b").public() == local.get_note("b").public()  # type: ignore[union-attr]
        pg.put_note(note("b", [0.0, 1.0], "moved", at=2))
        assert pg.get_note("b").tags == ["moved"]  # type: ignore[union-attr]
        assert pg.delete_note("b") is True
        assert pg.delete_note("b") is False

        local.delete_note("a")
        local.put_note(note("fresh", [1.0, 1.0], at=9))
        # local: b, c, fresh; postgres: a, c. c is there already: b and fresh go up
        assert notes_service.hand_up(local, pg) == 2
        assert local.export() == []
        assert [n.id for n in pg.list_notes(None, 10)] == ["fresh", "c", "b", "a"]
    finally:
        pg.close()
        local.close()


def test_a_lost_connection_is_made_again(dsn: str, schema: str) -> None:
    pg = PostgresRagStore(dsn, schema)
    try:
        pg.put_document(doc("x", ("survives", [1.0])))
        with psycopg.connect(dsn, autocommit=True) as conn:
            mine = "FROM pg_stat_activity WHERE application_name = %s"
            conn.execute(f"SELECT pg_terminate_backend(pid) {mine}", (f"rma-{schema}",))
            deadline = time.monotonic() + 30  # the backend ends a moment after the signal
            while conn.execute(f"SELECT count(*) {mine}", (f"rma-{schema}",)).fetchone() != (0,):
                assert time.monotonic() < deadline, "the terminated backend lingers"
                time.sleep(0.05)
        pg.db.ping_after = 0  # pinged before use: the dead connection is noticed and replaced
        assert pg.get_document("x") is not None
        assert pg.describe()["ok"] is True
        assert "***" in pg.describe()["dsn"]
    finally:
        pg.close()


def test_an_unreachable_database_is_store_unavailable() -> None:
    with pytest.raises(StoreUnavailable, match="PostgreSQL failed"):
        PostgresRagStore(dead_dsn(), "rma_rag")


@pytest.fixture
def fake_stack(server, test_gateway, fake_openai) -> Iterator[str]:  # type: ignore[no-untyped-def]
    with (
        server(fake_openai(), health=None) as fake,
        server(test_gateway({"chat": fake, "embeddings": fake}, {}), health=None) as gw,
    ):
        yield gw


def test_services_on_a_postgres_url(  # type: ignore[no-untyped-def]
    dsn: str, fake_stack: str, make_settings, server
) -> None:
    """RMA_SERVICE_STORE_URL: rag and notes keep their rows there, and say so in /health."""
    settings = make_settings(gateway_url=fake_stack, service_store_url=URL)
    try:
        with (
            server(build_app("rag", settings)) as rag_url,
            server(build_app("notes", settings)) as notes_url,
            httpx.Client(timeout=30) as client,
        ):
            assert client.get(f"{rag_url}/documents").status_code == 200  # once it has chosen
            health = client.get(f"{rag_url}/health").json()
            assert health["store"]["kind"] == "postgres"
            assert health["store"]["schema"] == "rma_rag"
            assert "***" in health["store"]["dsn"]
            body = {"id": "pg-doc", "title": "Lisbon", "text": "Zorblax is in Lisbon."}
            assert client.post(f"{rag_url}/documents", json=body).status_code == 201
            hits = client.post(f"{rag_url}/search", json={"query": "Where is Zorblax?"}).json()
            assert hits["results"][0]["document_id"] == "pg-doc"
            made = client.post(f"{notes_url}/notes", json={"text": "call the plumber"}).json()
            assert client.get(f"{notes_url}/health").json()["store"]["kind"] == "postgres"
            with psycopg.connect(dsn) as conn:
                row = conn.execute("SELECT title FROM rma_rag.documents WHERE id = 'pg-doc'")
                assert row.fetchone() == ("Lisbon",)
                row = conn.execute("SELECT text FROM rma_notes.notes WHERE id = %s", (made["id"],))
                assert row.fetchone() == ("call the plumber",)
            assert not (settings.service_data_dir / "rag.sqlite3").exists()
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("DROP SCHEMA IF EXISTS rma_rag CASCADE")
            conn.execute("DROP SCHEMA IF EXISTS rma_notes CASCADE")


def test_postgres_that_cannot_be_reached_is_a_clear_503(  # type: ignore[no-untyped-def]
    fake_stack: str, make_settings, server
) -> None:
    settings = make_settings(
        gateway_url=fake_stack, service_store="postgres", service_store_url=dead_dsn()
    )
    with server(build_app("rag", settings)) as url, httpx.Client(timeout=30) as client:
        r = client.get(f"{url}/documents")
        assert r.status_code == 503
        assert r.json()["error"]["code"] == "store_unavailable"
        assert "PostgreSQL" in r.json()["error"]["message"]
        store = client.get(f"{url}/health").json()["store"]
        assert store["kind"] is None
        assert "PostgreSQL failed" in store["reason"]
    assert not (settings.service_data_dir / "rag.sqlite3").exists()  # no silent fallback


def test_auto_without_a_data_tier_keeps_the_local_store(  # type: ignore[no-untyped-def]
    fake_stack: str, make_settings, server
) -> None:
    settings = make_settings(gateway_url=fake_stack)
    with server(build_app("notes", settings)) as url, httpx.Client(timeout=30) as client:
        assert client.post(f"{url}/notes", json={"text": "local note"}).status_code == 201
        store = client.get(f"{url}/health").json()["store"]
        assert store["kind"] == "local"
        assert store["setting"] == "auto"
        assert "no API key" in store["reason"]
    assert (settings.service_data_dir / "notes.sqlite3").exists()


def test_a_folder_from_before_is_handed_up_at_start(  # type: ignore[no-untyped-def]
    dsn: str, fake_stack: str, make_settings, server
) -> None:
    """auto: documents a rag kept in its folder before it had PostgreSQL move there at start."""
    settings = make_settings(gateway_url=fake_stack, service_store_url=URL)
    old = LocalRagStore(settings.service_data_dir)
    old.put_document(doc("from-before", ("kept in the folder", [1.0, 0.0])))
    old.close()
    try:
        with server(build_app("rag", settings)) as url, httpx.Client(timeout=30) as client:
            listed = client.get(f"{url}/documents").json()["documents"]  # once it has chosen
            assert [d["id"] for d in listed] == ["from-before"]
            store = client.get(f"{url}/health").json()["store"]
            assert store["kind"] == "postgres"
            assert store["handed_up"] == 1
        left = LocalRagStore(settings.service_data_dir)
        assert left.list_documents() == []
        left.close()
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("DROP SCHEMA IF EXISTS rma_rag CASCADE")


def test_auto_with_an_unreachable_url_keeps_the_folder(  # type: ignore[no-untyped-def]
    fake_stack: str, make_settings, server
) -> None:
    settings = make_settings(gateway_url=fake_stack, service_store_url=dead_dsn())
    with server(build_app("rag", settings)) as url, httpx.Client(timeout=30) as client:
        body = {"id": "here", "text": "Kept in the folder meanwhile."}
        assert client.post(f"{url}/documents", json=body).status_code == 201
        store = client.get(f"{url}/health").json()["store"]
        assert store["kind"] == "local"
        assert "PostgreSQL failed" in store["reason"]


def test_a_service_key_reaches_only_the_data_services_it_names() -> None:
    """The worker's service key (services ``*`` and ``postgres``): every HTTP service, postgres,
    no other data service; a key without services: no data service at all."""
    from rma.coordinator.credentials import ALL_HTTP, KeyInfo
    from rma.settings import CoordinatorSettings

    service_key = KeyInfo("k", "h", 0, services=frozenset({ALL_HTTP, "postgres"}))
    assert service_key.allows("rag")
    assert service_key.allows("embeddings")
    assert service_key.allows("postgres", data=True)
    assert not service_key.allows("redis", data=True)
    plain = KeyInfo("k", "h", 0)
    assert plain.allows("rag")
    assert not plain.allows("postgres", data=True)
    assert CoordinatorSettings().service_key_data == ["postgres"]
    assert CoordinatorSettings(service_key_data="").service_key_data == []
    assert CoordinatorSettings(service_key_data=" postgres, redis").service_key_data == [
        "postgres",
        "redis",
    ]


def test_auto_with_a_gateway_that_is_no_url_keeps_the_folder(  # type: ignore[no-untyped-def]
    make_settings, server
) -> None:
    settings = make_settings(gateway_url="nowhere", api_key="rma_key_x.y")
    with server(build_app("notes", settings)) as url, httpx.Client(timeout=30) as client:
        assert client.get(f"{url}/notes").status_code == 200
        store = client.get(f"{url}/health").json()["store"]
        assert store["kind"] == "local"
        assert "RMA_GATEWAY_URL" in store["reason"]
