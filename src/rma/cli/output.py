"""Output helpers: data to stdout (rich tables or one JSON document), messages to stderr."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Callable, Coroutine, Sequence
from datetime import UTC, datetime
from typing import Any, NoReturn, TypeVar

import typer
from pydantic import BaseModel
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

T = TypeVar("T")

err = Console(stderr=True, highlight=False)
out = Console(highlight=False)


def to_jsonable(data: Any) -> Any:
    if isinstance(data, BaseModel):
        return data.model_dump(mode="json")
    if isinstance(data, list | tuple):
        return [to_jsonable(d) for d in data]
    if isinstance(data, dict):
        return {k: to_jsonable(v) for k, v in data.items()}
    return data


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(to_jsonable(data), indent=2, default=str) + "\n")
    sys.stdout.flush()


def fail(
    message: str, *, json_mode: bool = False, code: str = "error", exit_code: int = 1
) -> NoReturn:
    """One ``error:`` line on stderr (and the JSON error on stdout under ``--json``), then exit."""
    if json_mode:
        print_json({"error": {"code": code, "message": message}})
    err.print(f"[red]error:[/red] {escape(message)}", soft_wrap=True)
    raise typer.Exit(exit_code)


def run_async(fn: Callable[[], Coroutine[Any, Any, T]], *, json_mode: bool = False) -> T:
    """Run a coroutine; turn any :class:`rma.client.RmaError` into a clean ``error:`` exit."""
    from rma.client import RmaError

    try:
        return asyncio.run(fn())
    except RmaError as exc:
        fail(exc.message, json_mode=json_mode, code=exc.code)
    except KeyboardInterrupt:
        err.print("interrupted")
        raise typer.Exit(130) from None


def ago(ts: datetime | None) -> str:
    if ts is None:
        return "never"
    secs = (datetime.now(UTC) - ts).total_seconds()
    if secs < 60:
        return f"{secs:.0f}s ago"
    if secs < 3600:
        return f"{secs / 60:.0f}m ago"
    return f"{secs / 3600:.1f}h ago"


def table(title: str | None, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    t = Table(title=title, show_edge=False, header_style="bold")
    for c in columns:
        t.add_column(c)
    for r in rows:
        # Cells are data, not markup: `pip install 'rma-pool[gpu]'` keeps its `[gpu]`.
        t.add_row(*(Text(str(v)) if v is not None else "-" for v in r))
    out.print(t)


STATUS_COLOURS = {
    "online": "green",
    "draining": "yellow",
    "paused": "cyan",
    "offline": "red",
    "left": "dim",
    "removed": "dim",
    "active": "green",
    "expired": "dim",
    "used": "dim",
    "revoked": "red",
}


def coloured(status: str) -> str:
    colour = STATUS_COLOURS.get(status)
    return f"[{colour}]{status}[/{colour}]" if colour else status
