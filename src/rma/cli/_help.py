"""Help-page fixes for the installed Typer: a flag takes no value, so it shows no type."""

from __future__ import annotations

from typing import Any

import click


def hide_flag_types() -> None:
    """Typer's rich help labels every flag `<bool>` (as if it took a value); label none."""
    try:
        from typer.core import TyperOption
    except ImportError:  # pragma: no cover - an older Typer without it shows no `<bool>`
        return
    original = getattr(TyperOption, "display_type_rich", None)
    if original is None or getattr(original, "_rma_flags_hidden", False):
        return

    def display_type_rich(self: Any, ctx: click.Context) -> str | None:
        if getattr(self, "is_flag", False) and self.metavar is None:
            return None
        result: str | None = original(self, ctx)
        return result

    display_type_rich._rma_flags_hidden = True  # type: ignore[attr-defined]
    TyperOption.display_type_rich = display_type_rich  # type: ignore[method-assign,assignment]
