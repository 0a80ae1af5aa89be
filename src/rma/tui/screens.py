"""Modal screens: confirm an action, show the keys."""

from __future__ import annotations

from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Label, Static

FILTER_HELP = (
    "Filter: words that must all match. A bare word matches any field; "
    "status:offline, tier:gpu, service:llm, label:zone=eu, transport:tunnel, id:3f2a, "
    "trust:quarantined."
)


class ConfirmScreen(ModalScreen[bool]):
    """Ask before an action that changes the pool; dismisses with True only on yes."""

    BINDINGS = [
        Binding("y", "answer(True)", "Yes"),
        Binding("n", "answer(False)", "No"),
        Binding("escape", "answer(False)", "Cancel"),
    ]

    def __init__(self, question: str, detail: str = "", *, danger: bool = False) -> None:
        super().__init__()
        self.question = question
        self.detail = detail
        self.danger = danger

    def compose(self) -> ComposeResult:
        with Vertical(id="confirm"):
            yield Label(self.question, id="question")
            if self.detail:
                yield Label(self.detail, id="detail-text")
            with Horizontal(id="buttons"):
                yield Button(
                    "Yes (y)", id="yes", variant="error" if self.danger else "primary", compact=True
                )
                yield Button("No (n)", id="no", compact=True)

    def on_mount(self) -> None:
        self.query_one("#no", Button).focus()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")

    def action_answer(self, yes: bool) -> None:
        self.dismiss(yes)


class HelpScreen(ModalScreen[None]):
    """The keys, and the filter syntax."""

    BINDINGS = [
        Binding("escape,q,question_mark", "app.pop_screen", "Close"),
    ]

    def __init__(self, keys: list[tuple[str, str]]) -> None:
        super().__init__()
        self.keys = keys

    def compose(self) -> ComposeResult:
        table = Table.grid(padding=(0, 2))
        table.add_column(style="bold cyan", no_wrap=True)
        table.add_column()
        for key, what in self.keys:
            table.add_row(key, what)
        with VerticalScroll(id="help"):
            yield Static(Text("rma top: keys", "bold"))
            yield Static(table)
            yield Static(Text(FILTER_HELP, "dim"), id="filter-help")
            yield Static(Text("esc or ? closes this", "dim"))
