"""docs/dashboard.md stays honest: its pictures exist, and every key of the app is documented."""

from __future__ import annotations

import re
from pathlib import Path

from rma.tui.app import TopApp

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "dashboard.md"

KEY_NAMES = {"question_mark": "?", "slash": "/", "escape": "escape"}


def test_every_picture_exists_and_every_picture_is_used():
    text = DOC.read_text()
    named = re.findall(r"!\[[^\]]*\]\((img/[^)]+)\)", text)
    assert named, "the page shows no screenshots"
    for rel in named:
        path = DOC.parent / rel
        assert path.is_file(), f"{rel} is missing: run tests/tui/make_screenshots.py"
        assert path.read_text().lstrip().startswith("<svg"), rel
    made = {f"img/{p.name}" for p in (DOC.parent / "img").glob("top-*.svg")}
    assert made <= set(named), f"pictures not on the page: {sorted(made - set(named))}"


def test_every_key_is_documented():
    text = DOC.read_text()
    for binding in TopApp.BINDINGS:
        for key in binding.key.split(","):  # type: ignore[union-attr]
            shown = KEY_NAMES.get(key, key)
            if shown.isdigit():
                assert "`1`-`7`" in text
                continue
            assert f"`{shown}`" in text, f"key {shown!r} ({binding.description}) is not documented"


def test_the_command_line_is_documented():
    text = DOC.read_text()
    for option in ("--coordinator", "--admin-key", "--ca-file", "--refresh"):
        assert option in text
