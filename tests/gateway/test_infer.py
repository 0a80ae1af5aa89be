"""``rma infer`` in a subprocess (as a user runs it) against a real coordinator and backend."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from tests.gateway.conftest import CATALOG

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


def _stdin_rma(pool, *args: str, stdin: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "RMA_COORDINATOR_URL": pool.url, "RMA_API_KEY": pool.api_key}
    return subprocess.run(
        [sys.executable, "-m", "rma", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


def test_infer_reads_the_prompt_from_stdin(pool, backends) -> None:
    pool.add_worker("wa", {"fake": backends("a").url})
    # `-` reads stdin; the backend echoes the prompt's length: "hello there" is 11 characters
    res = _stdin_rma(pool, "infer", "-", "--no-stream", stdin="hello there\n")
    assert res.returncode == 0, res.stderr
    assert res.stdout == "echo(11) from a\n"
    # no PROMPT at all, with piped input: the same
    res = _stdin_rma(pool, "infer", "--no-stream", stdin="hello there")
    assert res.returncode == 0, res.stderr
    assert res.stdout == "echo(11) from a\n"
    # empty input is a usage error (exit 2), nothing is sent
    res = _stdin_rma(pool, "infer", "-", stdin="  \n")
    assert res.returncode == 2
    assert "the prompt from stdin is empty" in res.stderr


EMBED_CATALOG = (
    CATALOG
    + """
[services.vec]
description = "an embeddings-only OpenAI service"
tier = 3
kind = "openai"
task = "embeddings"
models = ["vec-model"]
command = ["true"]
health = "/health"
"""
)


def test_infer_with_an_embeddings_model_says_so(pool_factory, backends) -> None:
    pool = pool_factory(catalog_text=EMBED_CATALOG)
    pool.add_worker("wa", {"vec": backends("a").url})
    res = rma(pool, "infer", "hello", "-m", "vec-model")
    assert res.returncode == 1
    err = [ln for ln in res.stderr.splitlines() if not ln.startswith("import time:")]
    assert len(err) == 1 and err[0].startswith("error: vec-model is an embeddings model"), err
    assert "/v1/embeddings" in err[0]
