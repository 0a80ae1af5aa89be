"""``OPTIONS`` and ``405`` answers that name every documented method of a path.

Starlette answers a method mismatch with the ``Allow`` of the first route that matched the path
only (``GET /api/admin/keys`` hid ``POST /api/admin/keys``).  This middleware answers
``OPTIONS`` itself (204 and the full ``Allow``) and rewrites ``Allow`` on every 405, from the
paths of ``/openapi.json`` (so the two cannot disagree).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from starlette.routing import compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

_ORDER = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")
_DOCUMENTED = {m.lower() for m in _ORDER}


def _compile(schema: dict[str, Any]) -> list[tuple[re.Pattern[str], str]]:
    table = []
    for template, item in schema.get("paths", {}).items():
        methods = {m.upper() for m in item if m in _DOCUMENTED}
        if not methods:
            continue
        if "GET" in methods:
            methods.add("HEAD")
        methods.add("OPTIONS")
        # a trailing {path} is a path parameter that spans segments (/api/services/x/a/b)
        route = re.sub(r"/\{path\}$", "/{path:path}", template)
        regex, _, _ = compile_path(route)
        allow = [m for m in _ORDER if m in methods] + ["OPTIONS"]
        table.append((regex, ", ".join(allow)))
    return table


class MethodsMiddleware:
    def __init__(self, app: ASGIApp, schema: Callable[[], dict[str, Any]]) -> None:
        self.app = app
        self.schema = schema
        self._table: list[tuple[re.Pattern[str], str]] | None = None

    def allow(self, path: str) -> str | None:
        """The ``Allow`` value for ``path``; ``None`` for a path the schema does not have."""
        if self._table is None:
            self._table = _compile(self.schema())
        for regex, allow in self._table:
            if regex.match(path):
                return allow
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope["method"] == "OPTIONS":
            allow = self.allow(scope["path"])
            if allow is not None:
                headers = [(b"allow", allow.encode()), (b"content-length", b"0")]
                await send({"type": "http.response.start", "status": 204, "headers": headers})
                await send({"type": "http.response.body", "body": b""})
                return

        async def fixed_send(message: Message) -> None:
            if message["type"] == "http.response.start" and message["status"] == 405:
                allow = self.allow(scope["path"])
                if allow is not None:
                    rest = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"allow"]
                    message = {**message, "headers": [*rest, (b"allow", allow.encode())]}
            await send(message)

        await self.app(scope, receive, fixed_send)
