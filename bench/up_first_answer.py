"""Time from `rma up` to its first answer: ``python bench/up_first_answer.py [--runs 3]``.

Each run starts `rma up` (llm and embeddings) as a user would, then asks the chat model the same
question as `rma infer` until the first answer arrives; the clock starts when the process is
spawned.  Run 1 uses a fresh data dir (first start), later runs reuse it (the usual restart).
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def one_run(data: Path, port: int) -> float:
    url = f"http://127.0.0.1:{port}"
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
        "llm,embeddings",
    ]
    body = {
        "model": "smollm2-135m",
        "temperature": 0,
        "max_tokens": 16,
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
    }
    start = time.perf_counter()
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"rma up exited with {proc.returncode}")
            try:
                r = httpx.post(url + "/v1/chat/completions", json=body, timeout=30)
                if r.status_code == 200 and r.json()["choices"][0]["message"]["content"]:
                    return time.perf_counter() - start
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(60)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "pool"
        times = [one_run(data, free_port()) for _ in range(args.runs)]
    print(
        json.dumps(
            {
                "first_start_s": round(times[0], 2),
                "restart_s": [round(t, 2) for t in times[1:]],
                "restart_median_s": round(statistics.median(times[1:]), 2)
                if len(times) > 1
                else None,
            }
        )
    )


if __name__ == "__main__":
    main()
