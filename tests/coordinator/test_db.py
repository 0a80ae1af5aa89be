"""The database: Alembic migrations match the SQLModel tables, SQLite runs in WAL mode, upgrades
keep the data."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, text
from sqlmodel import SQLModel

import rma.coordinator.tables  # noqa: F401  (registers the tables)
from rma.coordinator.db import make_engine, migrate, normalize_url, session, sqlite_path
from rma.coordinator.tables import JoinToken, Worker


@pytest.fixture(autouse=True)
def _sqlite_dir(database_url: str) -> None:
    path = sqlite_path(database_url)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)


def test_migrations_produce_exactly_the_sqlmodel_metadata(database_url: str) -> None:
    engine = make_engine(database_url)
    try:
        migrate(engine)
        with engine.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={"compare_type": True})
            diff = compare_metadata(ctx, SQLModel.metadata)
        assert diff == [], f"the models and the migrations differ; add a revision: {diff}"
        tables = set(inspect(engine).get_table_names())
        assert {t.name for t in SQLModel.metadata.sorted_tables} <= tables
    finally:
        engine.dispose()


def test_one_linear_history_ending_at_the_database_head(database_url: str) -> None:
    cfg = Config()
    cfg.set_main_option("script_location", str(resources.files("rma.coordinator") / "migrations"))
    script = ScriptDirectory.from_config(cfg)
    assert len(script.get_heads()) == 1, "migration branches: merge them"
    engine = make_engine(database_url)
    try:
        migrate(engine)
        migrate(engine)  # idempotent
        with engine.connect() as conn:
            current = MigrationContext.configure(conn).get_current_revision()
        assert current == script.get_current_head()
    finally:
        engine.dispose()


def test_migrating_again_keeps_the_data(database_url: str) -> None:
    engine = make_engine(database_url)
    try:
        migrate(engine)
        with session(engine) as s:
            s.add(JoinToken(id="t1", secret_hash="h", created_at=1.0, expires_at=2.0))
            s.add(
                Worker(
                    id="w1",
                    name="n",
                    status="online",
                    tier=2,
                    capabilities={"cpu_cores": 2, "memory_mb": 4096},
                    labels={"a": "b"},
                    services=[],
                    assignments=["llm"],
                    load={},
                    transport="tunnel",
                    registered_at=1.0,
                    status_changed_at=1.0,
                )
            )
        engine.dispose()
        engine = make_engine(database_url)
        migrate(engine)
        with session(engine) as s:
            w = s.get(Worker, "w1")
            assert w is not None
            assert w.labels == {"a": "b"}
            assert w.assignments == ["llm"]
            assert s.get(JoinToken, "t1") is not None
    finally:
        engine.dispose()


def test_sqlite_runs_in_wal_mode_in_the_data_dir(tmp_path: Path) -> None:
    """The default database: SQLite in the data dir (made on first start), WAL journal."""
    from rma.coordinator.pool import Pool
    from rma.settings import CoordinatorSettings

    data = tmp_path / "fresh" / "data"
    settings = CoordinatorSettings(data_dir=data)
    assert settings.db_url == f"sqlite:///{data / 'rma.db'}"
    pool = Pool(settings)
    try:
        assert pool.bootstrap() is not None  # a new admin key, once
        with pool.engine.connect() as conn:
            assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
            assert conn.execute(text("PRAGMA foreign_keys")).scalar() == 1
        assert (data / "rma.db").is_file()
        assert (data / "rma.db-wal").exists()
    finally:
        pool.engine.dispose()


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgres://u:p@h/db", "postgresql+psycopg://u:p@h/db"),
        ("postgresql://u@h/db", "postgresql+psycopg://u@h/db"),
        ("postgresql+psycopg://u@h/db", "postgresql+psycopg://u@h/db"),
        ("sqlite:///x.db", "sqlite:///x.db"),
    ],
)
def test_database_urls_are_normalised_to_psycopg3(url: str, expected: str) -> None:
    assert normalize_url(url) == expected


def test_sqlite_path() -> None:
    assert sqlite_path("sqlite:////tmp/a/b.db") == Path("/tmp/a/b.db")
    assert sqlite_path("sqlite://") is None
    assert sqlite_path("sqlite:///:memory:") is None
    assert sqlite_path("postgresql://u@h/db") is None
