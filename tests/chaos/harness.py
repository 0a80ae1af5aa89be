"""The chaos experiments' parts: load that counts every outcome, machines that die, a scale knob.

Everything is real: ``rma coordinator serve`` and ``rma worker join`` processes, the fake backend
(``bench/fake_backend.py``) as the workers' service, the ``httpx`` client on real sockets.  The
CI subset runs each experiment small; ``nox -s chaos`` (``RMA_CHAOS_SCALE=full``) runs it long.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[2]
FAKE_BACKEND = ROOT / "bench" / "fake_backend.py"
FULL = os.environ.get("RMA_CHAOS_SCALE") == "full"
RESULTS = os.environ.get("RMA_CHAOS_RESULTS")  # a JSON-lines file that collects every report


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def scale(ci: float, full: float) -> float:
    """The CI figure, or the long one under ``nox -s chaos``."""
    return full if FULL else ci


def gateway_fixtures() -> Any:
    """``tests/gateway/conftest.py`` as a module (make_pool, start_backend, the catalogs)."""
    name = "_rma_gateway_conftest"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "tests/gateway/conftest.py")
    assert spec
    assert spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def chaos_catalog() -> str:
    """The test catalog, with a backend slow enough per answer that kills land mid-body."""
    gw = gateway_fixtures()
    never = gw.only_test_services_catalog().split("\n", 1)[1]
    text = f"""
[services.fake]
description = "fake OpenAI backend for the chaos suite"
tier = 3
kind = "openai"
models = ["fake-model", "fake-embed"]
command = ["{{python}}", "{FAKE_BACKEND}", "--port", "{{port}}", "--delay", "0.02",
           "--body-delay", "0.03", "--chunks", "6", "--chunk-delay", "0.02"]
health = "/health"
replicas = 16
"""
    # keep the other test service and the overrides that keep built-ins off the workers
    rest = never.split("[services.echo]", 1)[1]
    return text + "\n[services.echo]" + rest


# --- outcomes ---------------------------------------------------------------------------------


@dataclass
class Tally:
    """What a load run saw: every request counted once, by outcome."""

    sent: int = 0
    answered: int = 0
    failed: Counter[str] = field(default_factory=Counter)
    streams: Counter[str] = field(default_factory=Counter)  # clean, error_event, other:<why>
    extra: dict[str, Any] = field(default_factory=dict)

    def report(self, name: str) -> dict[str, Any]:
        out = {
            "experiment": name,
            "scale": "full" if FULL else "ci",
            "sent": self.sent,
            "answered": self.answered,
            "failed": dict(self.failed),
            "streams": dict(self.streams),
            **self.extra,
        }
        print(f"\nchaos {name}: {json.dumps(out)}", flush=True)
        if RESULTS:
            with open(RESULTS, "a") as fh:
                fh.write(json.dumps(out) + "\n")
        return out


def _is_error_event(text: str) -> bool:
    return text.rstrip().split("\n\n")[-1].startswith("event: error")


async def one_request(client: httpx.AsyncClient, i: int, stream: bool, tally: Tally) -> None:
    """One chat request; its outcome goes to ``tally``."""
    prompt = "x" * (i % 40 + 1)
    body: dict[str, Any] = {
        "model": "fake-model",
        "messages": [{"role": "user", "content": prompt}],
    }
    tally.sent += 1
    if not stream:
        try:
            r = await client.post("/v1/chat/completions", json=body)
        except httpx.HTTPError as exc:
            tally.failed[f"transport:{type(exc).__name__}"] += 1
            return
        if r.status_code != 200:
            tally.failed[f"http:{r.status_code}"] += 1
            return
        try:
            content = r.json()["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            tally.failed["bad_body"] += 1
            return
        if not content.startswith(f"echo({len(prompt)}) from "):
            tally.failed["wrong_answer"] += 1
            return
        tally.answered += 1
        return
    body["stream"] = True
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                await r.aread()
                tally.failed[f"http:{r.status_code}"] += 1
                tally.streams["refused_before_start"] += 1
                return
            text = ""
            async for part in r.aiter_text():
                text += part
    except httpx.HTTPError as exc:
        tally.failed[f"transport:{type(exc).__name__}"] += 1
        tally.streams[f"other:{type(exc).__name__}"] += 1
        return
    if text.rstrip().endswith("data: [DONE]"):
        tally.answered += 1
        tally.streams["clean"] += 1
    elif _is_error_event(text) and text.count("event: error") == 1:
        tally.failed["stream_error_event"] += 1
        tally.streams["error_event"] += 1
    else:
        tally.failed["stream_cut"] += 1
        tally.streams["other:cut"] += 1


async def load(
    url: str,
    key: str,
    seconds: float,
    concurrency: int,
    stream_every: int,
    tally: Tally,
    local_address: str | None = None,
) -> None:
    """``concurrency`` loops of requests for ``seconds``; every ``stream_every``-th is streamed
    (0: none).  Each loop keeps one keep-alive connection, so a connection a broken stream
    spoiled shows up as a failed next request.  ``local_address``: the client's source address
    (e.g. ``127.0.0.2``)."""
    stop = time.monotonic() + seconds
    counter = 0

    async def worker() -> None:
        nonlocal counter
        headers = {"authorization": f"Bearer {key}"}
        limits = httpx.Limits(max_connections=1)
        transport = httpx.AsyncHTTPTransport(limits=limits, local_address=local_address)
        async with httpx.AsyncClient(
            base_url=url, headers=headers, timeout=30, transport=transport
        ) as client:
            while time.monotonic() < stop:
                counter += 1
                i = counter
                stream = bool(stream_every) and i % stream_every == 0
                await one_request(client, i, stream, tally)

    await asyncio.gather(*(worker() for _ in range(concurrency)))


# --- machines -----------------------------------------------------------------------------------


def start_agent(
    url: str, token: str, catalog: Path, data_dir: Path, name: str, transport: str
) -> subprocess.Popen[bytes]:
    """A real ``rma worker join`` (process runtime) that runs the fake backend."""
    args = ["--coordinator", url, "--token", token, "--name", name, "--transport", transport]
    args += ["--runtime", "process", "--catalog", str(catalog), "--data-dir", str(data_dir)]
    data_dir.mkdir(parents=True, exist_ok=True)
    with open(data_dir.parent / f"{name}.log", "ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "rma", "worker", "join", *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "RMA_HEARTBEAT_INTERVAL": "1"},
        )


def kill_machine(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the agent and everything it started, as if the machine died."""
    try:
        family = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        family = []
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGKILL)
    for p in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(signal.SIGKILL)
    proc.wait(10)


def workers(coord: Any) -> list[dict[str, Any]]:
    with coord.admin() as c:
        data: list[dict[str, Any]] = c.get("/api/admin/workers").json()
        return data


def healthy(coord: Any, service: str = "fake") -> list[str]:
    return [
        w["name"]
        for w in workers(coord)
        if w["status"] == "online"
        and any(s["name"] == service and s["healthy"] for s in w["services"])
    ]


def wait_for(what: str, check: Any, timeout: float = 90, every: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(every)


def events(coord: Any, limit: int = 10_000) -> list[dict[str, Any]]:
    with coord.admin() as c:
        data: list[dict[str, Any]] = c.get("/api/admin/events", params={"limit": limit}).json()
        return data


def log_count(path: Path | None, needle: str) -> int:
    """How often ``needle`` occurs in a log file (0 when there is none)."""
    if path is None or not path.exists():
        return 0
    return path.read_text(errors="replace").count(needle)


def log_tracebacks(path: Path | None) -> int:
    return log_count(path, "Traceback")
