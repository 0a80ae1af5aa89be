"""Computing preferences: when this machine gives its time to the pool.

Kept in ``<data-dir>/prefs.json`` (0600), written by ``rma worker prefs set``, read when the agent
starts and again every check interval while it runs.  :class:`PrefsChecker` answers, each check,
why the agent must pause now (or ``None``: it may serve): the machine was not idle for
``idle_minutes`` (user input idle where it can be read, otherwise others' CPU use at or above
``cpu_idle_below`` %), it runs on battery, or the time is outside ``hours``.  The limits
(``max_cpu``, ``max_memory``, ``max_vram``) are the donor limits of ``rma worker join``; set here,
they take the place of the flags.

The sources (input idle, others' CPU use, battery, clock) are a :class:`Sources`; tests pass
their own.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import subprocess
import sys
from datetime import datetime
from datetime import time as dtime
from pathlib import Path
from typing import Any, Protocol

import psutil
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from rma.agent.state import ensure_dir, write_private

log = logging.getLogger("rma.agent")

PREFS_FILE = "prefs.json"

_RANGE = re.compile(r"^([01]?\d|2[0-3]):([0-5]\d)-([01]?\d|2[0-3]|24):([0-5]\d)$")


class PrefsError(Exception):
    """The preferences file or a value for it is not valid."""


def parse_hours(text: str) -> list[tuple[dtime, dtime]]:
    """``"22:00-07:00"`` or ``"09:00-12:00,14:00-18:00"`` (local time; may wrap midnight)."""
    ranges = []
    for part in text.split(","):
        m = _RANGE.match(part.strip())
        if m is None:
            raise ValueError(f"{part.strip()!r} is not HH:MM-HH:MM")
        h1, m1, h2, m2 = (int(g) for g in m.groups())
        end = dtime(23, 59, 59, 999999) if h2 == 24 else dtime(h2, m2)
        ranges.append((dtime(h1, m1), end))
    return ranges


def in_hours(ranges: list[tuple[dtime, dtime]], now: dtime) -> bool:
    for start, end in ranges:
        if start <= end:
            if start <= now < end:
                return True
        elif now >= start or now < end:  # wraps midnight
            return True
    return False


class Preferences(BaseModel):
    """What this donor allows, and when."""

    model_config = ConfigDict(extra="forbid")

    idle_minutes: float | None = Field(
        None, ge=0, description="Serve only after the machine was idle this long; None: always."
    )
    cpu_idle_below: float = Field(
        25.0,
        gt=0,
        le=100,
        description="Where input idle cannot be read: idle is others' CPU use below this %.",
    )
    on_battery: bool = Field(False, description="Serve on battery too (default: pause).")
    hours: str | None = Field(
        None,
        description="Serve only in these local hours, e.g. 22:00-07:00 or 9:00-12:00,14:00-18:00.",
    )
    max_cpu: float | None = Field(None, gt=0, description="CPU cores the pool may use here.")
    max_memory: int | None = Field(None, ge=0, description="Memory the pool may use here (MB).")
    max_vram: int | None = Field(None, ge=0, description="GPU memory the pool may use here (MB).")

    @field_validator("hours")
    @classmethod
    def _hours(cls, v: str | None) -> str | None:
        if v is None or not v.strip():
            return None
        parse_hours(v)
        return v.strip()

    def limits(self) -> dict[str, Any]:
        return {"max_cpu": self.max_cpu, "max_memory": self.max_memory, "max_vram": self.max_vram}


def load_prefs(data_dir: Path) -> Preferences:
    """The saved preferences (defaults when there is no file); a damaged file is an error."""
    path = data_dir / PREFS_FILE
    try:
        text = path.read_text()
    except FileNotFoundError:
        return Preferences()
    except OSError as exc:
        raise PrefsError(f"cannot read {path}: {exc.strerror}") from None
    try:
        return Preferences.model_validate_json(text)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "the file"
        raise PrefsError(f"{path}: {where}: {first['msg']}") from None


def save_prefs(data_dir: Path, prefs: Preferences) -> Path:
    ensure_dir(data_dir)
    path = data_dir / PREFS_FILE
    write_private(path, prefs.model_dump_json(indent=2, exclude_defaults=True) + "\n")
    return path


def update_prefs(data_dir: Path, changes: dict[str, Any]) -> Preferences:
    """Apply ``changes`` (field -> value; None resets a field) to the saved preferences."""
    current = load_prefs(data_dir).model_dump()
    current.update(changes)
    try:
        prefs = Preferences.model_validate(current)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise PrefsError(f"{where}: {first['msg']}") from None
    save_prefs(data_dir, prefs)
    return prefs


# --- where the facts come from -------------------------------------------------------------------


class Sources(Protocol):
    def input_idle(self) -> float | None:
        """Seconds since the last keyboard/mouse input, or ``None`` where it cannot be read."""

    def others_cpu(self) -> float:
        """CPU use (% of the machine) by everything but this agent and its services."""

    def on_battery(self) -> bool: ...

    def now(self) -> datetime:
        """Local time."""


class SystemSources:
    """This machine: X11 (``xprintidle``), macOS (``ioreg``) or Windows input idle; psutil."""

    def __init__(self) -> None:
        self._procs: dict[int, psutil.Process] = {}
        psutil.cpu_percent(None)

    def input_idle(self) -> float | None:
        try:
            if sys.platform == "darwin":
                return _ioreg_idle()
            if sys.platform == "win32":
                return _windows_idle()
            if os.environ.get("DISPLAY") and shutil.which("xprintidle"):
                res = subprocess.run(
                    ["xprintidle"], capture_output=True, text=True, timeout=5, check=False
                )
                if res.returncode == 0 and res.stdout.strip().isdigit():
                    return int(res.stdout.strip()) / 1000
        except (OSError, subprocess.SubprocessError, ValueError):
            pass
        return None

    def others_cpu(self) -> float:
        total = psutil.cpu_percent(None)
        mine = 0.0
        me = psutil.Process()
        seen: dict[int, psutil.Process] = {}
        with contextlib.suppress(psutil.Error):
            for p in [me, *me.children(recursive=True)]:
                proc = self._procs.get(p.pid, p)
                seen[p.pid] = proc
                with contextlib.suppress(psutil.Error):
                    mine += proc.cpu_percent(None)
        self._procs = seen
        return max(0.0, total - mine / (psutil.cpu_count() or 1))

    def on_battery(self) -> bool:
        try:
            battery = psutil.sensors_battery()
        except (AttributeError, NotImplementedError, OSError, RuntimeError):
            return False
        return battery is not None and not battery.power_plugged

    def now(self) -> datetime:
        return datetime.now()


def _ioreg_idle() -> float | None:
    res = subprocess.run(
        ["ioreg", "-c", "IOHIDSystem", "-d", "4"], capture_output=True, text=True, timeout=5
    )
    m = re.search(r'"HIDIdleTime" = (\d+)', res.stdout)
    return int(m.group(1)) / 1e9 if m else None


def _windows_idle() -> float | None:  # pragma: no cover - Windows only
    import ctypes

    class LastInput(ctypes.Structure):
        _fields_ = [("cbSize", ctypes.c_uint), ("dwTime", ctypes.c_uint)]

    info = LastInput()
    info.cbSize = ctypes.sizeof(info)
    win = getattr(ctypes, "windll")  # noqa: B009 - absent off Windows
    if not win.user32.GetLastInputInfo(ctypes.byref(info)):
        return None
    return float((win.kernel32.GetTickCount() - info.dwTime) / 1000)


# --- the check -----------------------------------------------------------------------------------


class PrefsChecker:
    """Why the preferences say "pause" now; remembers since when the CPU has been quiet."""

    def __init__(self, sources: Sources) -> None:
        self.sources = sources
        self._quiet_since: float | None = None

    def check(self, prefs: Preferences) -> str | None:
        src = self.sources
        now = src.now()
        if not prefs.on_battery and src.on_battery():
            return "on battery (computing preferences: not on battery)"
        if prefs.hours and not in_hours(parse_hours(prefs.hours), now.time()):
            return f"outside the hours {prefs.hours} (computing preferences)"
        if prefs.idle_minutes is None:
            self._quiet_since = None
            return None
        need = prefs.idle_minutes * 60
        idle = src.input_idle()
        if idle is not None:
            if idle >= need:
                return None
            return (
                f"waiting for idle: the machine was used {_mins(idle)} ago "
                f"(computing preferences: idle for {prefs.idle_minutes:g} min)"
            )
        busy = src.others_cpu()
        ts = now.timestamp()
        if busy >= prefs.cpu_idle_below:
            self._quiet_since = None
            return (
                f"waiting for idle: others use {busy:.0f}% of the CPU "
                f"(computing preferences: below {prefs.cpu_idle_below:g}% for "
                f"{prefs.idle_minutes:g} min)"
            )
        if self._quiet_since is None:
            self._quiet_since = ts
        quiet = ts - self._quiet_since
        if quiet >= need:
            return None
        return (
            f"waiting for idle: quiet for {_mins(quiet)} of {prefs.idle_minutes:g} min "
            f"(others' CPU below {prefs.cpu_idle_below:g}%)"
        )


def _mins(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"
