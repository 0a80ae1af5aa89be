"""The donor's pause switch: ``<data-dir>/pause.json`` (0600).

``rma worker pause [--for 2h]`` writes it, ``rma worker resume`` deletes it; the running agent
reads it every check interval (``RMA_CHECK_INTERVAL``), so the commands need no connection to the
agent, work while it is starting, and a pause outlives a restart of the agent (a reboot) until it
expires or is resumed.  Only the data dir's owner can write it (the data dir is 0700).
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, ValidationError

from rma.agent.state import agent_running, ensure_dir, load_status, write_private

PAUSE_FILE = "pause.json"


class PauseRequest(BaseModel):
    """A pause the donor asked for."""

    at: float = Field(description="When it was asked for (epoch seconds).")
    until: float | None = Field(None, description="When it ends by itself; None: at resume.")
    reason: str = Field("paused by the donor", max_length=200)

    def active(self, now: float) -> bool:
        return self.until is None or now < self.until

    def describe(self) -> str:
        if self.until is None:
            return f"{self.reason} (until `rma worker resume`)"
        left = max(0.0, self.until - time.time())
        return f"{self.reason} (for {format_duration(left)} more, or until `rma worker resume`)"


def format_duration(seconds: float) -> str:
    s = round(seconds)
    if s >= 3600:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


def parse_duration(text: str) -> float:
    """``90s``, ``15m``, ``2h``, ``1h30m``, ``1d`` or plain seconds -> seconds (> 0)."""
    import re

    raw = text.strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", raw):
        value = float(raw)
    else:
        parts = re.findall(r"(\d+(?:\.\d+)?)([smhd])", raw)
        if not parts or "".join(n + u for n, u in parts) != raw:
            raise ValueError(f"{text!r} is not a duration (like 90s, 15m, 2h, 1h30m, 1d)")
        unit = {"s": 1, "m": 60, "h": 3600, "d": 86400}
        value = sum(float(n) * unit[u] for n, u in parts)
    if value <= 0:
        raise ValueError(f"{text!r}: a duration must be more than 0")
    return value


def request_pause(
    data_dir: Path, seconds: float | None = None, reason: str | None = None
) -> PauseRequest:
    now = time.time()
    req = PauseRequest(
        at=now,
        until=None if seconds is None else now + seconds,
        reason=reason or "paused by the donor",
    )
    ensure_dir(data_dir)
    write_private(data_dir / PAUSE_FILE, req.model_dump_json(indent=2) + "\n")
    return req


def request_resume(data_dir: Path) -> bool:
    """Remove the pause; ``True`` when there was one."""
    try:
        (data_dir / PAUSE_FILE).unlink()
    except FileNotFoundError:
        return False
    return True


def load_pause(data_dir: Path, now: float | None = None) -> PauseRequest | None:
    """The donor's pause in force now, or ``None`` (an expired one is removed)."""
    path = data_dir / PAUSE_FILE
    try:
        text = path.read_text()
    except OSError:
        return None
    try:
        req = PauseRequest.model_validate_json(text)
    except ValidationError:
        return PauseRequest(at=0.0, reason=f"paused by the donor ({path.name} is damaged)")
    if not req.active(time.time() if now is None else now):
        with contextlib.suppress(OSError):
            path.unlink()
        return None
    return req


class DataDirSource:
    """What ``rma worker top`` shows and does, for the agent of one data dir."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir

    def status(self) -> tuple[dict[str, Any] | None, bool]:
        return load_status(self.data_dir), agent_running(self.data_dir) is not None

    def pause(self) -> None:
        request_pause(self.data_dir, None, "paused by the donor (rma worker top)")

    def resume(self) -> bool:
        return request_resume(self.data_dir)
