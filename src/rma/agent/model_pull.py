"""Fetching a service's models once it answers, before it is marked healthy.

``model_pull = "ollama"`` in the catalog: for each of the entry's ``models`` the agent asks the
service itself (``POST /api/pull`` on its own loopback port, streamed) and reports the progress in
the service's status message (``pulling llava:7b: 45% of 4.1 GB``). The models come from the
donor's own catalog definition (the policy refuses an assignment whose ``models`` differ), so the
coordinator cannot make a donor download something else.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import httpx

#: The longest status line the service may stream (a model's manifest names fit easily).
MAX_LINE = 64 * 1024


class PullFailed(Exception):
    """The service could not fetch a model; the message says which and why."""


def _size(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"


async def pull_ollama(
    http: httpx.AsyncClient, port: int, model: str, report: Callable[[str], None]
) -> None:
    """Pull ``model`` through the Ollama API on ``127.0.0.1:port``; ``report`` gets progress."""
    shown = -5
    url = f"http://127.0.0.1:{port}/api/pull"
    try:
        async with http.stream(
            "POST", url, json={"model": model, "stream": True}, timeout=httpx.Timeout(30, read=600)
        ) as response:
            if response.status_code != 200:
                text = (await response.aread())[:300].decode(errors="replace")
                raise PullFailed(f"pulling {model}: HTTP {response.status_code} {text}")
            async for line in response.aiter_lines():
                if len(line) > MAX_LINE:
                    raise PullFailed(f"pulling {model}: a progress line of {len(line)} bytes")
                if not line.strip():
                    continue
                try:
                    event = json.loads(line)
                except ValueError:
                    raise PullFailed(f"pulling {model}: not JSON: {line[:100]!r}") from None
                if not isinstance(event, dict):
                    raise PullFailed(f"pulling {model}: not a JSON object: {line[:100]!r}")
                if event.get("error"):
                    raise PullFailed(f"pulling {model}: {str(event['error'])[:300]}")
                total, done = event.get("total"), event.get("completed")
                if isinstance(total, int) and isinstance(done, int) and total > 0:
                    percent = min(100, int(100 * done / total))
                    if percent >= shown + 5:
                        shown = percent
                        report(f"pulling {model}: {percent}% of {_size(total)}")
                if event.get("status") == "success":
                    return
    except httpx.HTTPError as exc:
        raise PullFailed(f"pulling {model}: {type(exc).__name__}: {exc}") from None
    raise PullFailed(f"pulling {model}: the stream ended before success")
