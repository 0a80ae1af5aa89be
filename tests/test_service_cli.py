"""``rma service list`` and ``rma service run`` as a user types them."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
from tests.conftest import free_port

BUILTIN = {
    "vllm",
    "ollama",
    "llm",
    "embeddings",
    "ocr",
    "ner",
    "doc",
    "rag",
    "notes",
    "postgres",
    "redis",
    "chromadb",
    "neo4j",
}


def rma(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rma", *args], capture_output=True, text=True, timeout=60
    )


def test_list_json_has_every_service_with_tier_and_needs() -> None:
    proc = rma("service", "list", "--json")
    assert proc.returncode == 0, proc.stderr
    services = {s["name"]: s for s in json.loads(proc.stdout)}
    assert set(services) == BUILTIN
    assert services["vllm"]["tier"] == 1 and services["vllm"]["gpu"] is True
    assert services["llm"]["tier"] == 2 and services["llm"]["models"] == ["smollm2-135m"]
    assert services["postgres"]["tier"] == 3 and services["postgres"]["image"].startswith(
        "postgres"
    )
    assert services["embeddings"]["task"] == "embeddings"


def test_list_with_operator_catalog_adds_and_overrides(tmp_path: Path) -> None:
    cat = tmp_path / "catalog.toml"
    cat.write_text(
        '[services.llm.resources]\nmemory_mb = 3000\n[services.mine]\ntier = 3\nimage = "me/x:1"\n'
    )
    services = {
        s["name"]: s
        for s in json.loads(rma("service", "list", "--json", "--catalog", str(cat)).stdout)
    }
    assert services["llm"]["resources"]["memory_mb"] == 3000
    assert services["llm"]["models"] == ["smollm2-135m"]  # the rest of the entry is kept
    assert services["mine"]["image"] == "me/x:1"


def test_list_with_broken_catalog_is_one_error_line(tmp_path: Path) -> None:
    cat = tmp_path / "catalog.toml"
    cat.write_text("[services.llm]\ntier = 9\n")
    proc = rma("service", "list", "--catalog", str(cat))
    assert proc.returncode == 1
    assert proc.stderr.startswith("error:") and "tier" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_run_unknown_service_is_usage_error() -> None:
    proc = rma("service", "run", "nope")
    assert proc.returncode == 2
    assert "error:" in proc.stderr and "llm" in proc.stderr


def test_run_serves_health(tmp_path: Path) -> None:
    """`rma service run notes` answers /health (notes needs no model to start)."""
    port = free_port()
    env = {"RMA_SERVICE_DATA_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "rma", "service", "run", "notes", "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
                if r.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, (
                proc.stdout.read() if proc.stdout else ""
            )
            time.sleep(0.2)
        body = r.json()
        assert (body["status"], body["service"]) == ("ok", "notes")
        # no pool to reach (no coordinator, no service key): notes keeps its store in its folder
        assert body["store"]["kind"] in ("local", "choosing"), body
    finally:
        proc.terminate()
        proc.wait(10)
        if proc.stdout:
            proc.stdout.close()
