"""AWS Signature Version 4 (``Authorization`` header), as S3 and S3-compatible stores expect.

https://docs.aws.amazon.com/IAM/latest/UserGuide/reference_sigv-create-signed-request.html:
a canonical request (method, URI, query, headers, payload hash) is hashed into a string to
sign, which is HMAC'd with a key derived from the secret, the date, region and service.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Iterable, Mapping
from datetime import datetime
from urllib.parse import quote

ALGORITHM = "AWS4-HMAC-SHA256"
#: ``x-amz-content-sha256`` of a request without a body.
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
_SPACES = re.compile(r"\s+")


def uri_encode(value: str, *, keep_slash: bool) -> str:
    """RFC 3986 percent-encoding of everything but ``A-Za-z0-9-._~`` (and ``/`` if asked)."""
    return quote(value, safe="/~" if keep_slash else "~")


def canonical_query(params: Iterable[tuple[str, str]]) -> str:
    pairs = sorted(
        (uri_encode(k, keep_slash=False), uri_encode(v, keep_slash=False)) for k, v in params
    )
    return "&".join(f"{k}={v}" for k, v in pairs)


def canonical_request(
    method: str,
    path: str,
    params: Iterable[tuple[str, str]],
    headers: Mapping[str, str],
    payload_sha256: str,
) -> tuple[str, str]:
    """The canonical request and its signed-headers list (``path`` not yet encoded; S3
    encodes it once)."""
    cleaned = {k.lower(): _SPACES.sub(" ", v.strip()) for k, v in headers.items()}
    names = sorted(cleaned)
    signed = ";".join(names)
    lines = [
        method.upper(),
        uri_encode(path or "/", keep_slash=True),
        canonical_query(params),
        "".join(f"{n}:{cleaned[n]}\n" for n in names),
        signed,
        payload_sha256,
    ]
    return "\n".join(lines), signed


def signing_key(secret_key: str, date: str, region: str, service: str) -> bytes:
    key = ("AWS4" + secret_key).encode()
    for part in (date, region, service, "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    return key


def authorization(
    *,
    method: str,
    path: str,
    params: Iterable[tuple[str, str]],
    headers: Mapping[str, str],
    payload_sha256: str,
    access_key: str,
    secret_key: str,
    region: str,
    service: str,
    when: datetime,
) -> str:
    """The ``Authorization`` header for a request whose ``headers`` (``host`` and
    ``x-amz-date`` among them) are all signed; ``when`` is UTC."""
    amz_date = when.strftime("%Y%m%dT%H%M%SZ")
    date = amz_date[:8]
    request, signed = canonical_request(method, path, params, headers, payload_sha256)
    scope = f"{date}/{region}/{service}/aws4_request"
    to_sign = "\n".join([ALGORITHM, amz_date, scope, hashlib.sha256(request.encode()).hexdigest()])
    key = signing_key(secret_key, date, region, service)
    signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    return (
        f"{ALGORITHM} Credential={access_key}/{scope}, SignedHeaders={signed}, "
        f"Signature={signature}"
    )
