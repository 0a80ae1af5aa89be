"""A model-free OpenAI embeddings backend for tests: a hashed bag of words, unit length.

``python hash_embed_backend.py --port N``: ``GET /health``, ``GET /v1/models`` and
``POST /v1/embeddings`` (model ``hash-embed``, 64 dimensions). Texts that share words are near.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

MODEL = "hash-embed"


def vector(text: str) -> list[float]:
    out = [0.0] * 64
    for word in re.findall(r"\w+", text.lower()):
        out[int(hashlib.sha256(word.encode()).hexdigest(), 16) % 64] += 1.0
    norm = math.sqrt(sum(x * x for x in out)) or 1.0
    return [x / norm for x in out]


class Handler(BaseHTTPRequestHandler):
    def _send(self, status: int, body: Any) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if self.path == "/health":
            self._send(200, {"status": "ok"})
        elif self.path == "/v1/models":
            self._send(200, {"object": "list", "data": [{"id": MODEL, "object": "model"}]})
        else:
            self._send(404, {"error": {"code": "not_found", "message": self.path}})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers.get("content-length") or 0)) or b"{}")
        if self.path != "/v1/embeddings":
            self._send(404, {"error": {"code": "not_found", "message": self.path}})
            return
        texts = body["input"] if isinstance(body.get("input"), list) else [body.get("input", "")]
        data = [
            {"object": "embedding", "index": i, "embedding": vector(str(t))}
            for i, t in enumerate(texts)
        ]
        self._send(200, {"object": "list", "data": data, "model": MODEL, "usage": {}})

    def log_message(self, format: str, *args: Any) -> None:
        pass


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    ThreadingHTTPServer(("127.0.0.1", args.port), Handler).serve_forever()


if __name__ == "__main__":
    main()
