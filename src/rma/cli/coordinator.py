"""``rma coordinator serve`` and ``rma coordinator reset-admin-key``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from rma.cli.options import DataDirOpt

app = typer.Typer(help="Run the coordinator.", no_args_is_help=True)


@app.command()
def serve(
    host: Annotated[
        str | None, typer.Option(help="Address to listen on (default: 127.0.0.1).")
    ] = None,
    port: Annotated[int | None, typer.Option(help="Port to listen on (default: 8420).")] = None,
    data_dir: DataDirOpt = None,
    database_url: Annotated[
        str | None,
        typer.Option("--database-url", help="SQLAlchemy URL (default: SQLite in the data dir)."),
    ] = None,
    redis_url: Annotated[
        str | None,
        typer.Option(
            "--redis-url",
            help="Redis shared by several coordinators on one database: rate limits, failed-auth "
            "counts, key revocations.",
        ),
    ] = None,
    catalog: Annotated[
        Path | None, typer.Option(help="Operator's catalog TOML (adds or overrides services).")
    ] = None,
    config: Annotated[
        Path | None, typer.Option(help="TOML config file ([coordinator] section).")
    ] = None,
    tls_cert: Annotated[
        Path | None, typer.Option("--tls-cert", help="PEM certificate: serve HTTPS.")
    ] = None,
    tls_key: Annotated[
        Path | None, typer.Option("--tls-key", help="PEM private key for --tls-cert.")
    ] = None,
    anonymous_clients: Annotated[
        bool | None,
        typer.Option(
            "--anonymous-clients/--no-anonymous-clients", help="Serve /v1/* without an API key."
        ),
    ] = None,
    forwarded_allow_ips: Annotated[
        str | None,
        typer.Option(
            "--forwarded-allow-ips",
            help="Behind a reverse proxy: the proxy addresses whose X-Forwarded-* are trusted.",
        ),
    ] = None,
    log_level: Annotated[
        str,
        typer.Option(help="Server log level: critical, error, warning, info, debug, trace."),
    ] = "info",
) -> None:
    """Run the coordinator: registry, gateway, admin API and liveness sweeper."""
    from pydantic import ValidationError

    from rma.cli.output import fail
    from rma.coordinator.serve import ServeError, serve_coordinator, settings_error
    from rma.settings import CoordinatorSettings

    try:
        if config is not None and not config.is_file():
            raise ServeError(f"no such config file: {config}")
        try:
            settings = CoordinatorSettings.load(
                config,
                host=host,
                port=port,
                data_dir=data_dir,
                database_url=database_url,
                redis_url=redis_url,
                catalog=catalog,
                tls_cert=tls_cert,
                tls_key=tls_key,
                anonymous_clients=anonymous_clients,
                forwarded_allow_ips=forwarded_allow_ips,
            )
        except ValidationError as exc:
            raise settings_error(exc) from None
        serve_coordinator(settings, log_level=log_level)
    except ServeError as exc:
        fail(str(exc))


@app.command("reset-admin-key")
def reset_admin_key(
    data_dir: DataDirOpt = None,
    database_url: Annotated[
        str | None,
        typer.Option("--database-url", help="SQLAlchemy URL (default: SQLite in the data dir)."),
    ] = None,
    config: Annotated[
        Path | None, typer.Option(help="TOML config file ([coordinator] section).")
    ] = None,
) -> None:
    """Make a new admin key (the old one stops working) and write it to <data-dir>/admin.key.

    For a lost admin.key: run it on the coordinator's machine, with its database. A running
    coordinator picks the new key up within its key refresh interval (30 s by default).
    """
    from pydantic import ValidationError

    from rma.cli.output import err, fail
    from rma.coordinator.pool import Pool
    from rma.coordinator.serve import ServeError, one_line, settings_error
    from rma.settings import CoordinatorSettings

    try:
        if config is not None and not config.is_file():
            raise ServeError(f"no such config file: {config}")
        try:
            settings = CoordinatorSettings.load(
                config, data_dir=data_dir, database_url=database_url
            )
        except ValidationError as exc:
            raise settings_error(exc) from None
        try:
            pool = Pool(settings)
            pool.bootstrap()
            pool.credentials.rotate_admin_key(pool.admin_key_file)
        except Exception as exc:
            raise ServeError(f"cannot open the database: {one_line(exc)}") from None
        pool.events.emit(
            "admin_key_reset", "the admin key was replaced (rma coordinator reset-admin-key)"
        )
    except ServeError as exc:
        fail(str(exc))
    err.print(
        f"new admin key written to {pool.admin_key_file} (mode 0600); the old key no longer works"
    )
