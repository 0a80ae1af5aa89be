"""The operator's first five minutes, typed as a user types them, each a real subprocess:

rma coordinator serve --port P --data-dir D
rma admin tokens create --json
curl -X POST .../api/worker/register -d '{"token": ..., ...}'
rma admin workers --json
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.slow

RMA = str(Path(sys.executable).with_name("rma"))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), env=env, capture_output=True, text=True, timeout=60)


def _post_with_curl_or_httpx(url: str, body: str) -> tuple[int, str]:
    curl = shutil.which("curl")
    if curl is None:  # curl is what a user would type; httpx says the same over the same wire
        r = httpx.post(url, content=body, headers={"content-type": "application/json"})
        return r.status_code, r.text
    out = subprocess.run(
        [curl, "-sS", "-X", "POST", url, "-H", "content-type: application/json", "-d", body,
         "-w", "\n%{http_code}"],
        capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    text, _, code = out.stdout.rpartition("\n")
    return int(code), text


def test_serve_token_curl_register_list(tmp_path: Path, database_url: str) -> None:
    data = tmp_path / "pool"
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "RMA_DATA_DIR": str(data), "RMA_COORDINATOR_URL": url}
    serve = [RMA, "coordinator", "serve", "--port", str(port), "--data-dir", str(data)]
    if not database_url.startswith("sqlite"):
        serve += ["--database-url", database_url]
    log = tmp_path / "serve.log"
    with open(log, "w") as fh:
        server = subprocess.Popen(serve, env=env, stdout=fh, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            assert server.poll() is None, log.read_text()
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        started = log.read_text()
        assert f"admin key created and written to {data / 'admin.key'}" in started
        assert f"coordinator listening on {url}" in started

        made = _run(RMA, "admin", "tokens", "create", "--json", env=env)
        assert made.returncode == 0, made.stderr
        token = json.loads(made.stdout)["token"]

        body = json.dumps(
            {
                "token": token,
                "name": "curl-box",
                "capabilities": {"cpu_cores": 2, "memory_mb": 4096},
            }
        )
        status, text = _post_with_curl_or_httpx(f"{url}/api/worker/register", body)
        assert status == 201, text
        worker_id = json.loads(text)["worker_id"]

        listed = _run(RMA, "admin", "workers", "--json", env=env)
        assert listed.returncode == 0, listed.stderr
        workers = json.loads(listed.stdout)
        assert [(w["id"], w["name"], w["status"], w["tier_name"]) for w in workers] == [
            (worker_id, "curl-box", "online", "service")
        ]
        # and the same token, single-use, is spent
        status, text = _post_with_curl_or_httpx(f"{url}/api/worker/register", body)
        assert status == 401
        assert json.loads(text)["error"]["code"] == "token_used"
    finally:
        server.terminate()
        server.wait(15)
    # a clean shutdown on SIGTERM (uvicorn re-raises the signal once it has shut down)
    assert server.returncode in (0, -signal.SIGTERM), log.read_text()
    assert "Application shutdown complete" in log.read_text()
    assert "Traceback" not in log.read_text()
