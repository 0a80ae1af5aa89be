"""Secrets the coordinator hands out: the admin key, join tokens and client API keys.

Each is shown once and stored as a SHA-256 hash.  The admin key's and the API keys' hashes are
also kept in memory, so checking them never waits on the database.
"""

from __future__ import annotations

import hmac
import os
import secrets
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import Engine, update
from sqlmodel import col, select

from rma.coordinator import security
from rma.coordinator.clock import Clock
from rma.coordinator.db import session
from rma.coordinator.errors import APIError
from rma.coordinator.tables import ApiKey, JoinToken, Setting
from rma.schemas.api import ApiKeyCreated, ApiKeyPublic, TokenCreated, TokenPublic

ADMIN_HASH = "admin_key_hash"
SIGNING_KEY = "credential_signing_key"


def _dt(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


def token_public(row: JoinToken, now: float) -> TokenPublic:
    if row.revoked:
        status = "revoked"
    elif row.expires_at <= now:
        status = "expired"
    elif row.uses is not None and row.used >= row.uses:
        status = "used"
    else:
        status = "active"
    return TokenPublic(
        id=row.id,
        label=row.label,
        created_at=_dt(row.created_at),
        expires_at=_dt(row.expires_at),
        uses=row.uses,
        used=row.used,
        revoked=row.revoked,
        status=status,
    )


def key_public(row: ApiKey) -> ApiKeyPublic:
    return ApiKeyPublic(
        id=row.id,
        name=row.name,
        rpm=row.rpm,
        created_at=_dt(row.created_at),
        revoked=row.revoked,
        last_used_at=_dt(row.last_used_at) if row.last_used_at else None,
    )


@dataclass(frozen=True, slots=True)
class KeyInfo:
    id: str
    secret_hash: str
    rpm: int


def write_secret_file(path: Path, secret: str) -> None:
    """Write ``secret`` to ``path`` readable by its owner only (0600), atomically."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(secret + "\n")
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


class Credentials:
    def __init__(self, engine: Engine, clock: Clock, default_rpm: int) -> None:
        self.engine = engine
        self.clock = clock
        self.default_rpm = default_rpm
        self.signing_key = ""
        self._admin_hash = ""
        self._keys: dict[str, KeyInfo] = {}
        self._lock = threading.Lock()

    # --- start-up ------------------------------------------------------------------------------

    def bootstrap(self, admin_key_file: Path | None) -> str | None:
        """Load or create the signing key and admin key; return a new admin key once."""
        created: str | None = None
        with session(self.engine) as s:
            signing = s.get(Setting, SIGNING_KEY)
            if signing is None:
                signing = Setting(key=SIGNING_KEY, value=secrets.token_urlsafe(48))
                s.add(signing)
            admin = s.get(Setting, ADMIN_HASH)
            if admin is None:
                created = security.new_admin_key()
                admin = Setting(key=ADMIN_HASH, value=security.hash_secret(created))
                s.add(admin)
            self.signing_key = signing.value
            self._admin_hash = admin.value
            rows = s.exec(select(ApiKey).where(col(ApiKey.revoked).is_(False))).all()
            self._keys = {r.id: KeyInfo(r.id, r.secret_hash, r.rpm) for r in rows}
        if created and admin_key_file is not None:
            write_secret_file(admin_key_file, created)
        return created

    # --- the admin key ----------------------------------------------------------------------------

    def is_admin(self, secret: str) -> bool:
        return bool(self._admin_hash) and security.same_hash(secret, self._admin_hash)

    def rotate_admin_key(self, admin_key_file: Path | None) -> str:
        new = security.new_admin_key()
        with session(self.engine) as s:
            row = s.get(Setting, ADMIN_HASH) or Setting(key=ADMIN_HASH, value="")
            row.value = security.hash_secret(new)
            s.add(row)
        self._admin_hash = security.hash_secret(new)
        if admin_key_file is not None:
            write_secret_file(admin_key_file, new)
        return new

    # --- join tokens ------------------------------------------------------------------------------

    def create_token(self, ttl: float, uses: int | None, label: str) -> TokenCreated:
        ident, secret = security.new_prefixed_secret(security.TOKEN_PREFIX)
        now = self.clock.time()
        row = JoinToken(
            id=ident,
            secret_hash=security.hash_secret(secret),
            label=label,
            created_at=now,
            expires_at=now + ttl,
            uses=uses,
        )
        with session(self.engine) as s:
            s.add(row)
        return TokenCreated(**token_public(row, now).model_dump(), token=secret)

    def list_tokens(self) -> list[TokenPublic]:
        now = self.clock.time()
        with session(self.engine) as s:
            rows = s.exec(select(JoinToken).order_by(col(JoinToken.created_at))).all()
            return [token_public(r, now) for r in rows]

    def revoke_token(self, token_id: str) -> TokenPublic:
        with session(self.engine) as s:
            row = s.get(JoinToken, token_id)
            if row is None:
                raise APIError(404, f"no join token {token_id!r}")
            row.revoked = True
            s.add(row)
            return token_public(row, self.clock.time())

    def check_token(self, secret: str) -> str:
        """The token's id if it may be used now; raise 401 with the reason otherwise."""
        ident = security.split_prefixed(secret, security.TOKEN_PREFIX)
        with session(self.engine) as s:
            row = s.get(JoinToken, ident) if ident else None
            if row is None or not security.same_hash(secret, row.secret_hash):
                raise APIError(401, "unknown join token", "invalid_token")
            reason = token_public(row, self.clock.time()).status
        if reason != "active":
            messages = {
                "revoked": "this join token was revoked",
                "expired": "this join token has expired; ask the operator for a new one",
                "used": "this join token has been used up; ask the operator for a new one",
            }
            raise APIError(401, messages[reason], f"token_{reason}")
        return row.id

    def consume_token(self, token_id: str) -> None:
        """Count one use, atomically: two joins racing for the last use cannot both win."""
        now = self.clock.time()
        stmt = (
            update(JoinToken)
            .where(col(JoinToken.id) == token_id)
            .where(col(JoinToken.revoked).is_(False))
            .where(col(JoinToken.expires_at) > now)
            .where(col(JoinToken.uses).is_(None) | (col(JoinToken.used) < col(JoinToken.uses)))
            .values(used=col(JoinToken.used) + 1)
        )
        with session(self.engine) as s:
            result = s.exec(stmt)
            if result.rowcount != 1:
                raise APIError(401, "this join token has been used up", "token_used")

    # --- client API keys --------------------------------------------------------------------------

    def create_key(self, name: str, rpm: int | None) -> ApiKeyCreated:
        ident, secret = security.new_prefixed_secret(security.KEY_PREFIX)
        row = ApiKey(
            id=ident,
            secret_hash=security.hash_secret(secret),
            name=name,
            rpm=self.default_rpm if rpm is None else rpm,
            created_at=self.clock.time(),
        )
        with session(self.engine) as s:
            s.add(row)
        with self._lock:
            self._keys[ident] = KeyInfo(ident, row.secret_hash, row.rpm)
        return ApiKeyCreated(**key_public(row).model_dump(), key=secret)

    def list_keys(self) -> list[ApiKeyPublic]:
        with session(self.engine) as s:
            return [key_public(r) for r in s.exec(select(ApiKey).order_by(col(ApiKey.created_at)))]

    def revoke_key(self, key_id: str) -> ApiKeyPublic:
        with session(self.engine) as s:
            row = s.get(ApiKey, key_id)
            if row is None:
                raise APIError(404, f"no API key {key_id!r}")
            row.revoked = True
            s.add(row)
            public = key_public(row)
        with self._lock:
            self._keys.pop(key_id, None)
        return public

    def check_key(self, secret: str) -> KeyInfo | None:
        """The key if valid (in memory, constant time); ``None`` otherwise."""
        ident = security.split_prefixed(secret, security.KEY_PREFIX)
        info = self._keys.get(ident) if ident else None
        if info is None:
            return None
        ok = hmac.compare_digest(security.hash_secret(secret), info.secret_hash)
        return info if ok else None
