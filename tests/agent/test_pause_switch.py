"""The pause switch file: durations, expiry, a damaged file."""

from __future__ import annotations

import stat
import time
from pathlib import Path

import pytest

from rma.agent.pause import PAUSE_FILE, load_pause, parse_duration, request_pause, request_resume


@pytest.mark.parametrize(
    ("text", "seconds"), [("90s", 90), ("15m", 900), ("2h", 7200), ("1h30m", 5400), ("30", 30)]
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["soon", "2x", "0", "1h 30m", "-5m", ""])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


def test_a_pause_for_a_while_expires_by_itself(tmp_path: Path) -> None:
    req = request_pause(tmp_path, 60, "dinner")
    path = tmp_path / PAUSE_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    now = time.time()
    got = load_pause(tmp_path, now)
    assert got is not None and got.reason == "dinner" and got.until == req.until
    assert load_pause(tmp_path, now + 61) is None  # expired: gone
    assert not path.exists()


def test_resume_and_a_damaged_switch(tmp_path: Path) -> None:
    assert request_resume(tmp_path) is False
    request_pause(tmp_path)
    assert request_resume(tmp_path) is True
    (tmp_path / PAUSE_FILE).write_text("{not json")
    got = load_pause(tmp_path)
    assert got is not None and "damaged" in got.reason  # a damaged switch still pauses
