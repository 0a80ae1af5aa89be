"""The ``since`` parameter of the admin API (``rma admin credits --since``): a point in time.

Two spellings, both read by :func:`parse_since`:

- an ISO-8601 timestamp (``2026-12-01T12:00:00Z``, ``2026-12-01 12:00+02:00``, ``2026-12-01``);
  one without a zone is UTC;
- a duration back from now: a number and a unit, ``s``, ``m``, ``h``, ``d`` or ``w``
  (``30m``, ``24h``, ``7d``; a bare number is seconds).

The coordinator reads it with its own clock, so a client's clock skew does not move the window.
Pure standard library: the CLI and the coordinator both import it.
"""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}

#: The longest text read (a timestamp with microseconds and a zone fits easily).
MAX_LENGTH = 64


def parse_since(text: str, now: float) -> float:
    """``text`` as a Unix time (seconds): a timestamp, or ``now`` minus a duration.

    Raises :class:`ValueError` with a message fit for the user on anything else.
    """
    hint = "use an ISO-8601 timestamp (2026-12-01T12:00:00Z) or a duration like 30m, 24h or 7d"
    if not text.strip() or len(text) > MAX_LENGTH:
        raise ValueError(f"{text[:MAX_LENGTH]!r} is not a time: {hint}")
    m = _DURATION.match(text.lower())
    if m:
        seconds = float(m.group(1)) * _UNITS[m.group(2)]
        if not math.isfinite(seconds) or seconds <= 0:
            raise ValueError(f"{text!r} is not a duration above zero: {hint}")
        return now - seconds
    try:
        ts = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"{text!r} is not a time: {hint}") from None
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=UTC)
    return ts.timestamp()
