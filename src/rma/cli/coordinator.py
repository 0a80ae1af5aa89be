"""``rma coordinator serve``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from rma.cli.options import DataDirOpt

app = typer.Typer(help="Run the coordinator.", no_args_is_help=True)


@app.command()
def serve(
    host: Annotated[
        str | None, typer.Option(help="Address to listen on [default: 127.0.0.1].")
    ] = None,
    port: Annotated[int | None, typer.Option(help="Port to listen on [default: 8420].")] = None,
    data_dir: DataDirOpt = None,
    database_url: Annotated[
        str | None,
        typer.Option("--database-url", help="SQLAlchemy URL [default: SQLite in the data dir]."),
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
