"""The ``rma`` entry point.  Sub-command modules import their heavy parts lazily."""

from __future__ import annotations

from typing import Annotated

import typer

from rma import __version__
from rma.cli import admin, coordinator
from rma.cli._help import hide_flag_types

hide_flag_types()
app = typer.Typer(
    name="rma",
    help="rma: turn donated machines into one AI compute pool.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.add_typer(coordinator.app, name="coordinator")
app.add_typer(admin.app, name="admin")


def _optional(module: str, attr: str = "register") -> None:
    """Attach a command group whose module may not exist yet in this build."""
    import importlib

    try:
        mod = importlib.import_module(f"rma.cli.{module}")
    except ModuleNotFoundError as exc:
        if exc.name != f"rma.cli.{module}":
            raise
        return
    getattr(mod, attr)(app)


for _name in ("worker", "service", "up", "infer", "connect"):
    _optional(_name)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"rma {__version__}")
        raise typer.Exit


@app.callback()
def main(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Show the version and exit."
        ),
    ] = False,
) -> None:
    """rma: turn donated machines into one AI compute pool."""


def run() -> None:
    app()
