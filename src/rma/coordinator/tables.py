"""The coordinator's database tables.  Times are UNIX seconds (float): portable across databases.

Change a table -> add an Alembic revision in ``migrations/versions`` (a test compares them).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import JSON, BigInteger, Column
from sqlmodel import Field, SQLModel


class Worker(SQLModel, table=True):
    id: str = Field(primary_key=True, max_length=64)
    name: str = Field(index=True, max_length=64)
    status: str = Field(index=True, max_length=16)
    tier: int
    capabilities: dict[str, Any] = Field(sa_column=Column(JSON, nullable=False))
    labels: dict[str, str] = Field(sa_column=Column(JSON, nullable=False))
    services: list[dict[str, Any]] = Field(sa_column=Column(JSON, nullable=False))
    assignments: list[str] = Field(sa_column=Column(JSON, nullable=False))
    load: dict[str, Any] = Field(sa_column=Column(JSON, nullable=False))
    transport: str = Field(max_length=16)
    endpoint: str | None = Field(default=None, max_length=500)
    trusted: bool = False
    version: str = Field(default="", max_length=50)
    registered_at: float
    last_heartbeat_at: float | None = None
    status_changed_at: float
    token_id: str | None = Field(default=None, max_length=32)
    secret_hash: str = Field(default="", max_length=128)
    drained: bool = False  # the operator's drain; survives going offline and coming back
    #: the catalog services its runtime can start (from registration); null: every one that fits
    runnable: list[str] | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    revoked: bool = False  # removed by the operator (not by the sweeper): needs a new join token
    # verification (coordinator/trust): results compared, found wrong, the current run of
    # agreements (it sets the verification rate), and the quarantine that keeps clients away
    verified: int = 0
    disagreements: int = 0
    verify_streak: int = 0
    quarantined: bool = False
    #: who donates it (``rma worker join --owner``; the ``owner`` label when empty)
    owner: str = Field(default="", max_length=64)


class JoinToken(SQLModel, table=True):
    __tablename__ = "join_token"
    id: str = Field(primary_key=True, max_length=32)
    secret_hash: str = Field(max_length=128)
    label: str = Field(default="", max_length=200)
    created_at: float
    expires_at: float
    uses: int | None = None
    used: int = 0
    revoked: bool = False


class ApiKey(SQLModel, table=True):
    __tablename__ = "api_key"
    id: str = Field(primary_key=True, max_length=32)
    secret_hash: str = Field(max_length=128)
    #: indexed: a worker's service key is found by name (``worker services <id>``)
    name: str = Field(default="", max_length=200, index=True)
    rpm: int = 0
    created_at: float
    revoked: bool = False
    last_used_at: float | None = None
    #: the donor it belongs to (``rma admin keys create --owner``): queue priority by credits
    owner: str = Field(default="", max_length=64)
    #: the services it may use, comma-separated (``--services``); "": every service but the
    #: data tier's (kind tcp), which a key must name
    services: str = Field(default="", max_length=2000)


class Setting(SQLModel, table=True):
    """Coordinator-wide values: the admin key's hash, the credential signing key."""

    key: str = Field(primary_key=True, max_length=64)
    value: str = Field(max_length=512)


class Event(SQLModel, table=True):
    id: int | None = Field(default=None, primary_key=True)
    ts: float = Field(index=True)
    kind: str = Field(index=True, max_length=32)
    worker_id: str | None = Field(default=None, index=True, max_length=64)
    message: str = Field(max_length=1000)
    data: dict[str, Any] = Field(sa_column=Column(JSON, nullable=False))


class Credit(SQLModel, table=True):
    """The credits ledger, append-only (``coordinator/trust/credits.py``).

    ``kind``: ``earn`` (credited to an established worker), ``escrow`` (held for a new one),
    ``release`` (escrow moved to credits), ``forfeit`` (escrow lost on quarantine).  ``key_id``:
    the client key that asked (debited ``amount``) for ``earn`` and ``escrow`` rows.
    """

    id: int | None = Field(default=None, primary_key=True)
    ts: float = Field(index=True)
    kind: str = Field(max_length=16)
    worker_id: str | None = Field(default=None, index=True, max_length=64)
    key_id: str | None = Field(default=None, index=True, max_length=32)
    service: str = Field(default="", max_length=64)
    amount: float


class Usage(SQLModel, table=True):
    """One gateway request: who asked, which worker served it, how it went."""

    id: int | None = Field(default=None, primary_key=True)
    ts: float = Field(index=True)
    key_id: str | None = Field(default=None, index=True, max_length=32)
    service: str = Field(index=True, max_length=64)
    worker_id: str | None = Field(default=None, index=True, max_length=64)
    status: int
    latency_ms: float
    prompt_tokens: int = 0
    completion_tokens: int = 0
    attempts: int = 1


class Backup(SQLModel, table=True):
    """A data service's backup (``coordinator/backups.py``): its bytes are in a backup store
    (``location``: ``s3:<bucket>`` or ``local:<coordinator>``, at ``key``), this row is what
    every coordinator on the database lists and serves from."""

    service: str = Field(primary_key=True, max_length=64)
    id: str = Field(primary_key=True, max_length=100)
    worker_id: str = Field(max_length=64)
    worker: str = Field(max_length=64)
    created_at: float = Field(index=True)
    size: int = Field(sa_column=Column(BigInteger, nullable=False))
    sha256: str = Field(max_length=64)
    location: str = Field(max_length=200)
    key: str = Field(max_length=500)
