"""A stand-in for Ollama's pull API, run as a real process by the agent's tests.

Ollama itself cannot run here (no binary, and no registry to pull models from), so this speaks the
two routes the agent uses: ``GET /api/version`` and ``POST /api/pull`` (NDJSON progress, as
Ollama streams it). A model named ``broken:*`` fails the way Ollama reports a missing model.
Every pulled model is appended to ``pulled.txt`` in the current folder.
"""

from __future__ import annotations

import json
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"  # the stream ends when the connection closes

    def log_message(self, *_: object) -> None:
        pass

    def _send(self, lines: list[dict[str, object]], pause: float = 0.0) -> None:
        """One NDJSON line at a time, ``pause`` seconds apart, as a slow download streams."""
        self.send_response(200)
        self.send_header("content-type", "application/x-ndjson")
        self.end_headers()
        for line in lines:
            self.wfile.write(json.dumps(line).encode() + b"\n")
            self.wfile.flush()
            time.sleep(pause)

    def do_GET(self) -> None:
        if self.path == "/api/version":
            self._send([{"version": "0.0.0-standin"}])
        else:
            self.send_error(404)

    def do_POST(self) -> None:
        length = int(self.headers.get("content-length", 0))
        model = json.loads(self.rfile.read(length))["model"]
        if self.path != "/api/pull":
            self.send_error(404)
            return
        if model.startswith("broken:"):
            self._send(
                [
                    {"status": "pulling manifest"},
                    {"error": "pull model manifest: file does not exist"},
                ]
            )
            return
        total = 4_000_000_000
        steps = [{"status": "pulling manifest"}]
        steps += [
            {"status": "pulling abc", "total": total, "completed": total * i // 4} for i in range(5)
        ]
        steps += [{"status": "verifying sha256 digest"}, {"status": "success"}]
        with Path("pulled.txt").open("a") as f:
            f.write(model + "\n")
        self._send(steps, pause=0.2)


if __name__ == "__main__":
    ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
