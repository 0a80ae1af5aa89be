"""Write the dashboard screenshots in ``docs/img`` (SVG) from the fixed dataset of ``tui_stub``.

Run from the repository root: ``.venv/bin/python tests/tui/make_screenshots.py``.
``test_docs.py`` checks that every picture ``docs/dashboard.md`` names exists.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from tui_stub import make_app, settle, settle_credits  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
IMG = ROOT / "docs" / "img"

#: (file name, keys to press, terminal size)
SHOTS: list[tuple[str, list[str], tuple[int, int]]] = [
    ("top-workers-80x24.svg", [], (80, 24)),
    ("top-workers-160x48.svg", [], (160, 48)),
    ("top-pool-160x48.svg", ["2"], (160, 48)),
    ("top-load-160x48.svg", ["3"], (160, 48)),
    ("top-load-80x24.svg", ["3"], (80, 24)),
    ("top-events-80x24.svg", ["4"], (80, 24)),
    ("top-services-160x48.svg", ["6"], (160, 48)),
    ("top-credits-160x48.svg", ["7"], (160, 48)),
    ("top-confirm-80x24.svg", ["down", "d"], (80, 24)),
    ("top-unquarantine-80x24.svg", ["k"], (80, 24)),
    ("top-help-80x24.svg", ["question_mark"], (80, 24)),
]


async def shoot(name: str, keys: list[str], size: tuple[int, int]) -> None:
    app = make_app()
    async with app.run_test(size=size) as pilot:
        if keys == ["7"]:  # the ledger is read once its tab is shown
            await settle_credits(pilot)
        else:
            await settle(pilot)
            await pilot.press(*keys)
        await pilot.pause(0.3)
        app.save_screenshot(name, str(IMG))


def main() -> None:
    os.environ.pop("NO_COLOR", None)
    IMG.mkdir(parents=True, exist_ok=True)
    for name, keys, size in SHOTS:
        asyncio.run(shoot(name, keys, size))
        print(IMG / name)


if __name__ == "__main__":
    main()
