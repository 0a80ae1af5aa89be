"""Shared options (``Annotated`` aliases) and the client factory."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from rma.client import CoordinatorClient

JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")]
CoordinatorOpt = Annotated[
    str | None,
    typer.Option(
        "--coordinator",
        envvar="RMA_COORDINATOR_URL",
        help="Coordinator URL (default: http://127.0.0.1:8420); several as URL1,URL2: failover.",
    ),
]
AdminKeyOpt = Annotated[
    str | None,
    typer.Option(
        "--admin-key",
        envvar="RMA_ADMIN_KEY",
        help="Admin key (default: <data-dir>/admin.key).",
        show_default=False,
    ),
]
ApiKeyOpt = Annotated[
    str | None,
    typer.Option(
        "--api-key",
        envvar="RMA_API_KEY",
        help="Client API key for the gateway.",
        show_default=False,
    ),
]
CaFileOpt = Annotated[
    Path | None,
    typer.Option(
        "--ca-file",
        envvar="RMA_CA_FILE",
        help="CA bundle to verify the coordinator's TLS certificate.",
    ),
]
DataDirOpt = Annotated[
    Path | None,
    typer.Option(
        "--data-dir", envvar="RMA_DATA_DIR", help="Data directory (default: ~/.local/share/rma)."
    ),
]

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> float:
    """``90``, ``90s``, ``30m``, ``12h``, ``7d`` -> seconds."""
    m = _DURATION.match(text.lower())
    if not m or float(m.group(1)) <= 0:
        raise typer.BadParameter(f"{text!r} is not a duration like 30m, 12h or 7d")
    return float(m.group(1)) * _UNITS[m.group(2)]


def make_client(
    coordinator: str | None = None,
    admin_key: str | None = None,
    api_key: str | None = None,
    ca_file: Path | None = None,
    data_dir: Path | None = None,
) -> CoordinatorClient:
    """The client for a command; a bad setting raises :class:`rma.client.RmaError`."""
    from pydantic import ValidationError

    from rma.client import CoordinatorClient, RmaError, tls_verify
    from rma.settings import ClientSettings

    try:
        s = ClientSettings.load(
            coordinator_url=coordinator,
            admin_key=admin_key,
            api_key=api_key,
            ca_file=ca_file,
            data_dir=data_dir,
        )
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise RmaError("bad_setting", f"setting {where}: {first['msg']}") from None
    if not s.coordinator_url.startswith(("http://", "https://")):
        raise RmaError(
            "bad_setting",
            f"coordinator URL {s.coordinator_url!r} must start with http:// or https://",
        )
    import httpx

    try:
        httpx.URL(s.coordinator_url)
    except httpx.InvalidURL as exc:
        raise RmaError("bad_setting", f"coordinator URL {s.coordinator_url!r}: {exc}") from None
    return CoordinatorClient(
        s.coordinator_url,
        admin_key=s.resolved_admin_key(),
        api_key=s.api_key,
        timeout=s.timeout,
        verify=tls_verify(s.ca_file, s.insecure),
    )
