"""``rma up``: a local pool (coordinator + one worker) in one command."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from rma.cli.options import DataDirOpt
from rma.cli.output import err, fail


def register(root: typer.Typer) -> None:
    root.command("up")(up)


def up(
    host: Annotated[
        str,
        typer.Option(envvar="RMA_HOST", help="Address to listen on (loopback: no API key needed)."),
    ] = "127.0.0.1",
    port: Annotated[
        int, typer.Option(envvar="RMA_PORT", min=1, max=65535, help="Port to listen on.")
    ] = 8420,
    data_dir: DataDirOpt = None,
    services: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated services for the local worker (default: the built-in ones)."
        ),
    ] = None,
    catalog: Annotated[
        Path | None, typer.Option(envvar="RMA_CATALOG", help="Operator's catalog TOML.")
    ] = None,
    no_worker: Annotated[
        bool, typer.Option("--no-worker", help="Only the coordinator; workers join from elsewhere.")
    ] = False,
    log_level: Annotated[str, typer.Option(help="The coordinator's log level.")] = "warning",
) -> None:
    """Start a local pool: a coordinator and a worker with the built-in services."""
    import asyncio

    from rich.live import Live
    from rich.spinner import Spinner
    from rich.table import Table

    from rma.up import LocalPool, UpError, UpOptions

    names = [s.strip() for s in services.split(",") if s.strip()] if services else None
    opts = UpOptions(
        host=host,
        port=port,
        data_dir=data_dir,
        services=names,
        catalog=catalog,
        worker=not no_worker,
        log_level=log_level,
    )
    live: Live | None = None

    def render(states: dict[str, str]) -> Table:
        t = Table.grid(padding=(0, 2))
        for name, state in sorted(states.items()):
            icon = (
                "[green]✓[/green]"
                if state == "ready"
                else "[red]✗[/red]"
                if state in ("failed", "refused")
                else Spinner("dots")
            )
            t.add_row(icon, name, state)
        if not states:
            t.add_row(Spinner("dots"), "worker", "joining")
        return t

    def progress(states: dict[str, str]) -> None:
        nonlocal live
        if live is None:
            err.print(
                "starting services (a first start loads the models and fetches the "
                "embeddings weights once, 84 MB; this can take a minute):"
            )
            live = Live(render(states), console=err, refresh_per_second=8, transient=False)
            live.start()
        else:
            live.update(render(states))

    def ready(seconds: float) -> None:
        nonlocal live
        if live is not None:
            live.stop()
            live = None
            err.print()
        url = pool.settings.url
        failed = [n for n, s in pool.service_states().items() if s in ("failed", "refused")]
        err.print(f"[bold green]pool ready[/bold green] in {seconds:.1f} s at {url}")
        if failed:
            err.print(
                f"[yellow]not running:[/yellow] {', '.join(failed)} (see `rma worker status`)"
            )
        err.print(
            "next:\n"
            f'  rma infer "What is the capital of France?"   # a quick query\n'
            f"  rma admin top                                 # the dashboard\n"
            f"  rma admin tokens create                       # another machine may join\n"
            f'  OpenAI SDK: base_url="{url}/v1", api_key="unused"\n'
            "Ctrl-C stops the pool."
        )

    try:
        pool = LocalPool(opts, say=lambda m: err.print(m))
        code = asyncio.run(pool.run(on_ready=ready, progress=progress))
    except UpError as exc:
        fail(str(exc))
    finally:
        if live is not None:
            live.stop()
    err.print("pool stopped")
    raise typer.Exit(code)
