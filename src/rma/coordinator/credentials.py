"""Secrets the coordinator hands out: the admin key, join tokens and client API keys.

Each is shown once and stored as a SHA-256 hash.  The admin key's and the API keys' hashes are
also kept in memory, so checking a known key never waits on the database.

Several coordinators may share one database.  A key this coordinator has not seen (created on
another one) is looked up in the database once, off the event loop, and cached; a key the
database does not know is remembered as unknown for ``key_miss_ttl`` seconds, so garbage keys
cannot hammer the database.  Every ``key_refresh_interval`` seconds the whole cache is reloaded
from the database (:meth:`Credentials.refresh`): a key revoked elsewhere stops working here within
that bound, or at once where Redis carries the revocation (``rma.coordinator.shared``).
"""

from __future__ import annotations

import hmac
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import Engine, update
from sqlalchemy import select as sa_select
from sqlmodel import Session, col, select

from rma.coordinator import security
from rma.coordinator.clock import Clock
from rma.coordinator.db import session
from rma.coordinator.errors import APIError
from rma.coordinator.tables import ApiKey, JoinToken, Setting
from rma.schemas.api import ApiKeyCreated, ApiKeyPublic, TokenCreated, TokenPublic

ADMIN_HASH = "admin_key_hash"
SIGNING_KEY = "credential_signing_key"
#: Most unknown keys remembered at once (then the expired ones go, or all of them).
MAX_MISSES = 10_000

log = logging.getLogger("rma.coordinator")


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
        owner=row.owner,
        services=split_services(row.services),
    )


def split_services(text: str) -> list[str] | None:
    """The ``api_key.services`` column as a list; ``None`` when the key names none."""
    names = [n for n in text.split(",") if n]
    return names or None


def key_info(row: ApiKey) -> KeyInfo:
    names = split_services(row.services)
    return KeyInfo(row.id, row.secret_hash, row.rpm, row.owner, frozenset(names) if names else None)


@dataclass(frozen=True, slots=True)
class KeyInfo:
    id: str
    secret_hash: str
    rpm: int
    #: the donor the key belongs to (queue priority by the owner's credits)
    owner: str = ""
    #: the services it may use; ``None``: every one but the data tier's (kind tcp); with
    #: ``ALL_HTTP`` among them: every HTTP and OpenAI service and the data services it names
    services: frozenset[str] | None = None

    def allows(self, service: str, *, data: bool = False) -> bool:
        """Whether this key may use ``service`` (``data``: a kind tcp service, which a key
        reaches only when it names it)."""
        if self.services is None:
            return not data
        return service in self.services or (not data and ALL_HTTP in self.services)


#: In a key's services: every HTTP and OpenAI service (a worker's service key: its rag, notes
#: and doc call any of them, and reach only the data services named beside it).
ALL_HTTP = "*"


def write_secret_file(path: Path, secret: str) -> None:
    """Write ``secret`` to ``path`` readable by its owner only (0600), atomically."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(secret + "\n")
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


#: Shortest signing key accepted from a file (characters of ``secrets.token_urlsafe``: 192 bits).
MIN_SIGNING_KEY = 32


class SigningKeyError(ValueError):
    """The signing key file cannot be used (the message says why)."""


def load_signing_key(path: Path, legacy: str | None = None) -> str:
    """The signing key in ``path``; made there (0600) when missing, from ``legacy`` if given.

    Two coordinators starting at once agree: the file is created exclusively, and the loser
    reads the winner's key.
    """
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        key = legacy or secrets.token_urlsafe(48)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass
        else:
            with os.fdopen(fd, "w") as fh:
                fh.write(key + "\n")
            return key
    key = path.read_text().strip()
    if len(key) < MIN_SIGNING_KEY:
        raise SigningKeyError(
            f"the signing key in {path} is shorter than {MIN_SIGNING_KEY} characters"
        )
    if legacy and legacy != key:
        log.warning(
            "the signing key in %s differs from the one in the database: the file wins "
            "(worker credentials signed with the old key must re-join)",
            path,
        )
    mode = path.stat().st_mode & 0o077
    if mode:
        try:
            os.chmod(path, 0o600)
        except OSError:
            log.warning("%s is readable by others (mode %o): make it 0600", path, mode)
    return key


class Credentials:
    def __init__(
        self, engine: Engine, clock: Clock, default_rpm: int, miss_ttl: float = 5.0
    ) -> None:
        self.engine = engine
        self.clock = clock
        self.default_rpm = default_rpm
        self.miss_ttl = miss_ttl
        self.signing_key = ""
        self._admin_hash = ""
        self._keys: dict[str, KeyInfo] = {}  # id -> key; replaced whole by refresh()
        self._misses: dict[str, float] = {}  # SHA-256 of an unknown secret -> forget at (monotonic)
        self._revoked: set[str] = set()  # ids known revoked: never cached again
        #: Several coordinators: called in the transaction that changes a key or the admin key,
        #: so the others reload theirs when it commits (``cluster``).
        #: Tells the other coordinators (when the session commits) which key changed; "": the
        #: admin key, or anything else that needs a full reload.
        self.announce: Callable[[Session, str], None] | None = None
        self._lock = threading.Lock()
        #: Called with a key's id after this coordinator revoked it (Redis tells the others).
        self.on_revoke: list[Callable[[str], None]] = []

    # --- start-up ------------------------------------------------------------------------------

    def bootstrap(
        self, admin_key_file: Path | None, signing_key_file: Path | None = None
    ) -> str | None:
        """Load or create the signing key and admin key; return a new admin key once.

        With ``signing_key_file`` the credential signing key lives in that file (0600), never in
        the database: a key still in the database (an older coordinator's) is moved there and
        deleted from it.  Without one (a shared database and no key file mounted) the key stays
        in the database, where every coordinator finds it.
        """
        created: str | None = None
        with session(self.engine) as s:
            signing = s.get(Setting, SIGNING_KEY)
            if signing_key_file is not None:
                self.signing_key = load_signing_key(
                    signing_key_file, signing.value if signing is not None else None
                )
                if signing is not None:
                    s.delete(signing)
            else:
                if signing is None:
                    signing = Setting(key=SIGNING_KEY, value=secrets.token_urlsafe(48))
                    s.add(signing)
                self.signing_key = signing.value
            admin = s.get(Setting, ADMIN_HASH)
            if admin is None:
                created = security.new_admin_key()
                admin = Setting(key=ADMIN_HASH, value=security.hash_secret(created))
                s.add(admin)
            self._admin_hash = admin.value
        self.refresh()
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
            if self.announce is not None:
                self.announce(s, "")
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

    def create_key(
        self, name: str, rpm: int | None, owner: str = "", services: list[str] | None = None
    ) -> ApiKeyCreated:
        ident, secret = security.new_prefixed_secret(security.KEY_PREFIX)
        row = ApiKey(
            id=ident,
            secret_hash=security.hash_secret(secret),
            name=name,
            rpm=self.default_rpm if rpm is None else rpm,
            created_at=self.clock.time(),
            owner=owner,
            services=",".join(services or []),
        )
        with session(self.engine) as s:
            s.add(row)
            if self.announce is not None:
                self.announce(s, ident)
        with self._lock:
            self._keys[ident] = key_info(row)
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
            if self.announce is not None:
                self.announce(s, key_id)
        self.forget_key(key_id)
        for hook in self.on_revoke:
            hook(key_id)
        return public

    def forget_key(self, key_id: str) -> None:
        """``key_id`` was revoked (here or on another coordinator): refuse it from now on."""
        with self._lock:
            self._revoked.add(key_id)
            self._keys.pop(key_id, None)

    def check_key(self, secret: str) -> KeyInfo | None:
        """The key if valid and cached here (in memory, constant time); ``None`` otherwise.

        Never touches the database: a key made on another coordinator is ``None`` until looked
        up (:meth:`find_key`, :meth:`lookup_key`).
        """
        found = self._from_memory(secret)
        return found if isinstance(found, KeyInfo) else None

    async def find_key(self, secret: str) -> KeyInfo | None:
        """:meth:`check_key`, and a key unknown here is looked up in the database in a thread."""
        found = self._from_memory(secret)
        if found is not _UNKNOWN:
            return found if isinstance(found, KeyInfo) else None
        import anyio

        return await anyio.to_thread.run_sync(self._lookup, secret)

    def lookup_key(self, secret: str) -> KeyInfo | None:
        """:meth:`find_key` for code already off the event loop (it may block on the database)."""
        found = self._from_memory(secret)
        if found is not _UNKNOWN:
            return found if isinstance(found, KeyInfo) else None
        return self._lookup(secret)

    def _from_memory(self, secret: str) -> KeyInfo | object | None:
        """The cached answer for ``secret``: a key, ``None`` (refused), or ``_UNKNOWN``."""
        ident = security.split_prefixed(secret, security.KEY_PREFIX)
        if not ident:
            return None
        digest = security.hash_secret(secret)
        info = self._keys.get(ident)
        if info is not None:
            return info if hmac.compare_digest(digest, info.secret_hash) else None
        if ident in self._revoked:
            return None
        until = self._misses.get(digest)
        if until is not None and until > time.monotonic():
            return None
        return _UNKNOWN

    def _lookup(self, secret: str) -> KeyInfo | None:
        """Ask the database about a key this coordinator has not cached (blocking)."""
        ident = security.split_prefixed(secret, security.KEY_PREFIX)
        if not ident:
            return None
        digest = security.hash_secret(secret)
        with session(self.engine) as s:
            row = s.get(ApiKey, ident)
            info = key_info(row) if row is not None else None
            revoked = row is not None and row.revoked
        with self._lock:
            if revoked:
                self._revoked.add(ident)
            if (
                info is not None
                and ident not in self._revoked
                and hmac.compare_digest(digest, info.secret_hash)
            ):
                self._keys[ident] = info
                return info
            self._remember_miss(digest)
        return None

    def _remember_miss(self, digest: str) -> None:
        if self.miss_ttl <= 0:
            return
        now = time.monotonic()
        if len(self._misses) >= MAX_MISSES:
            self._misses = {d: t for d, t in self._misses.items() if t > now}
            if len(self._misses) >= MAX_MISSES:
                self._misses.clear()
        self._misses[digest] = now + self.miss_ttl

    def refresh_key(self, key_id: str) -> None:
        """Reload one API key from the database (another coordinator made or revoked it)."""
        with session(self.engine) as s:
            row = s.get(ApiKey, key_id)
        if row is None or row.revoked:
            self.forget_key(key_id)
            return
        with self._lock:
            if key_id not in self._revoked:
                self._keys[key_id] = key_info(row)

    def refresh(self) -> None:
        """Reload the admin key's hash and every active API key from the database (blocking).

        Keys revoked on another coordinator drop out of the cache, new ones come in.
        """
        t = ApiKey.__table__.c  # type: ignore[attr-defined]
        # plain rows, not ORM objects: every worker has a key, so this reads N rows (~10x less)
        stmt = sa_select(t.id, t.secret_hash, t.rpm, t.owner, t.services).where(
            t.revoked.is_(False)
        )
        with session(self.engine) as s:
            admin = s.get(Setting, ADMIN_HASH)
            admin_hash = admin.value if admin is not None else ""
            fresh = {}
            for ident, secret_hash, rpm, owner, services in s.connection().execute(stmt):
                names = split_services(services)
                fresh[ident] = KeyInfo(
                    ident, secret_hash, rpm, owner, frozenset(names) if names else None
                )
        with self._lock:
            for ident in self._revoked:
                fresh.pop(ident, None)
            self._keys = fresh
            if admin_hash:
                self._admin_hash = admin_hash

    async def refresh_loop(self, interval: float) -> None:
        """Run :meth:`refresh` every ``interval`` seconds (a background task of the app)."""
        import asyncio

        import anyio

        failing = False
        while True:
            await asyncio.sleep(interval)
            try:
                await anyio.to_thread.run_sync(self.refresh)
            except Exception as exc:  # the database is away: keep the cache, say so once
                if not failing:
                    log.warning("cannot reload API keys from the database: %s", exc)
                failing = True
            else:
                if failing:
                    log.warning("API keys reloaded from the database again")
                failing = False


_UNKNOWN = object()
