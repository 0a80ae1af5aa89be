"""The coordinator's identity as a pin: ``sha256:<hex>`` of its TLS certificate (DER).

The coordinator computes it from its own certificate file and prints it in the join line of
``rma admin tokens create``; the agent (``rma worker join --ca-hash ...``) refuses a coordinator
whose certificate does not hash to it.  The way kubeadm's ``--discovery-token-ca-cert-hash`` works,
but on the certificate itself (a self-signed certificate needs no CA then).
"""

from __future__ import annotations

import hashlib
import re
import ssl

PREFIX = "sha256:"
_HASH = re.compile(r"^sha256:[0-9a-f]{64}$")


def der_hash(der: bytes) -> str:
    """``sha256:<hex>`` of a certificate in DER form."""
    return PREFIX + hashlib.sha256(der).hexdigest()


def pem_hash(pem: str) -> str:
    """``sha256:<hex>`` of the first certificate in a PEM text (the server's own, by convention).

    Raises :class:`ValueError` when the text holds no certificate.
    """
    begin, end = "-----BEGIN CERTIFICATE-----", "-----END CERTIFICATE-----"
    start = pem.find(begin)
    stop = pem.find(end, start)
    if start < 0 or stop < 0:
        raise ValueError("no PEM certificate found")
    return der_hash(ssl.PEM_cert_to_DER_cert(pem[start : stop + len(end)] + "\n"))


def normalize(value: str) -> str:
    """A pin as given by a person (``sha256:AB:CD...``, any case) -> ``sha256:abcd...``.

    Raises :class:`ValueError` saying what a valid pin looks like.
    """
    text = value.strip().lower()
    if not text.startswith(PREFIX):
        text = PREFIX + text
    text = PREFIX + text[len(PREFIX) :].replace(":", "")
    if not _HASH.match(text):
        raise ValueError(
            "must be sha256: followed by 64 hex digits (from `rma admin tokens create`)"
        )
    return text


def join_command(coordinator_url: str, token: str, ca_hash: str | None) -> str:
    """The ``rma worker join`` line a donor pastes: the URL, the token and, with TLS, the pin."""
    import shlex
    from urllib.parse import urlsplit

    line = (
        f"rma worker join --coordinator {shlex.quote(coordinator_url)} --token {shlex.quote(token)}"
    )
    if ca_hash:
        line += f" --ca-hash {ca_hash}"
    host = (urlsplit(coordinator_url).hostname or "").lower()
    local = host in ("localhost", "::1") or host.startswith("127.")
    if coordinator_url.startswith("http://") and not local:
        line += " --insecure"  # no TLS: the operator's choice; the donor sees it in the line
    return line


def certificate_file_hash(path: str) -> str | None:
    """The pin of the certificate in a PEM file, or ``None`` when it cannot be read."""
    try:
        with open(path) as fh:
            return pem_hash(fh.read())
    except (OSError, ValueError):
        return None
