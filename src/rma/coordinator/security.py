"""Secrets: generation, hashing, and worker credentials (JWT)."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from typing import Any

import jwt

ISSUER = "rma-coordinator"
AUDIENCE = "rma-worker"
ALGORITHMS = ["HS256"]  # the explicit allow-list: never "none", never asymmetric confusion

ADMIN_PREFIX = "rma_admin_"
TOKEN_PREFIX = "rma_join_"  # noqa: S105 (a prefix, not a secret)
KEY_PREFIX = "rma_key_"


def hash_secret(secret: str) -> str:
    """SHA-256 of a high-entropy secret (256 bits: no salt or slow hash needed)."""
    return hashlib.sha256(secret.encode()).hexdigest()


def same_hash(secret: str, stored_hash: str) -> bool:
    return hmac.compare_digest(hash_secret(secret), stored_hash)


def new_id() -> str:
    return secrets.token_hex(6)


def new_admin_key() -> str:
    return ADMIN_PREFIX + secrets.token_urlsafe(32)


def new_prefixed_secret(prefix: str) -> tuple[str, str]:
    """``(id, secret)`` where the secret is ``<prefix><id>.<random>``."""
    ident = new_id()
    return ident, f"{prefix}{ident}.{secrets.token_urlsafe(32)}"


def split_prefixed(secret: str, prefix: str) -> str | None:
    """The id inside a prefixed secret, or ``None`` when it is not one."""
    if not secret.startswith(prefix):
        return None
    ident, sep, rest = secret[len(prefix) :].partition(".")
    if not sep or len(ident) != 12 or not rest:
        return None
    return ident


@dataclass(frozen=True, slots=True)
class Credential:
    worker_id: str
    expires_at: float


class CredentialError(Exception):
    pass


def issue_credential(signing_key: str, worker_id: str, now: float, ttl: float) -> tuple[str, float]:
    exp = now + ttl
    claims = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": worker_id,
        "iat": int(now),
        "exp": int(exp),
        "jti": secrets.token_hex(8),
    }
    return jwt.encode(claims, signing_key, algorithm=ALGORITHMS[0]), float(int(exp))


def verify_credential(
    signing_key: str, token: str, now: float, max_ttl: float | None = None
) -> Credential:
    """The credential's worker and expiry; :class:`CredentialError` when it does not verify,
    has expired, or (with ``max_ttl``) was issued for longer than this coordinator issues."""
    try:
        claims: dict[str, Any] = jwt.decode(
            token,
            signing_key,
            algorithms=ALGORITHMS,
            audience=AUDIENCE,
            issuer=ISSUER,
            options={"require": ["exp", "iat", "sub", "iss", "aud"], "verify_exp": False},
        )
    except jwt.PyJWTError as exc:
        raise CredentialError(f"invalid worker credential: {exc}") from None
    # expiry is checked against the coordinator's clock (testable), not the system's
    if float(claims["exp"]) <= now:
        raise CredentialError("worker credential expired; register again")
    # iat and exp are whole seconds: a lifetime of ttl rounds to at most ttl + 1
    if max_ttl is not None and float(claims["exp"]) - float(claims["iat"]) > max_ttl + 1:
        raise CredentialError("worker credential lifetime exceeds credential_ttl; register again")
    return Credential(worker_id=str(claims["sub"]), expires_at=float(claims["exp"]))
