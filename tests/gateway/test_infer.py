"""``rma infer`` in a subprocess (as a user runs it) against a real coordinator and backend."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

HEAVY = ("fastapi", "sqlmodel", "uvicorn", "textual", "docker", "sqlalchemy", "starlette")


def rma(pool, *args: str, key: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "RMA_COORDINATOR_URL": pool.url, "RMA_API_KEY": key or pool.api_key}
    return subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "rma", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


def imported(stderr: str) -> set[str]:
    mods = set()
    for line in stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            mods.add(line.rsplit("|", 1)[1].strip().split(".")[0])
    return mods


def test_infer_streams_the_answer_without_the_server_stack(pool, backends) -> None:
    pool.add_worker("wa", {"fake": backends("a").url})
    res = rma(pool, "infer", "hello there")
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout == "echo(11) from a echo(11) from a echo(11) from \n"
    assert not imported(res.stderr) & set(HEAVY), imported(res.stderr) & set(HEAVY)

    res = rma(pool, "infer", "hi", "--system", "be brief", "--no-stream", "--model", "fake-model")
    assert res.returncode == 0
    assert res.stdout == "echo(11) from a\n"  # "be brief hi": both messages reached the backend

    res = rma(pool, "infer", "hi", "--json", "--service", "fake", "--max-tokens", "5")
    assert res.returncode == 0
    doc = json.loads(res.stdout)
    assert doc["object"] == "chat.completion"
    assert doc["choices"][0]["message"]["content"] == "echo(2) from a"


def test_infer_says_clearly_when_the_pool_cannot_serve(pool, backends) -> None:
    res = rma(pool, "infer", "hello")
    assert res.returncode == 1
    assert res.stdout == ""
    err = [ln for ln in res.stderr.splitlines() if not ln.startswith("import time:")]
    assert err == [
        "error: the pool serves no models right now: no healthy worker runs an "
        "OpenAI-compatible service (rma admin workers shows the workers)"
    ]
    res = rma(pool, "infer", "hello", "--model", "fake-model", "--json")
    assert res.returncode == 1
    assert json.loads(res.stdout)["error"]["message"].startswith("no worker is running service")

    pool.add_worker("wa", {"fake": backends("a").url})
    res = (
        rma(pool, "infer", "hello", "--key-is-wrong")
        if False
        else rma(pool, "infer", "hello", key="rma_key_nope_nope")
    )
    assert res.returncode == 1
    assert "invalid API key" in res.stderr
    assert "Traceback" not in res.stderr
