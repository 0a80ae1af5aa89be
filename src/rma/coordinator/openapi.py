"""The complete ``/openapi.json``: every error answer documented, the roles' credentials, and
the gateway's routes (mounted as raw ASGI, so FastAPI does not see them).

FastAPI documents what the route functions declare; the answers that come from dependencies
(auth: 401/403/429), the body limit (413), lookups (404) and state conflicts (409) are added
here by route, in one place, so that the schema and the behaviour cannot drift apart per route.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI

_DESCRIPTIONS = {
    400: "Bad request (the body is not what the route needs)",
    401: "Missing or invalid credential",
    403: "A valid credential of another role",
    404: "Not found",
    409: "Conflicts with the current state",
    413: "Request body too large",
    422: "Validation error",
    429: "Too many requests (rate limit, failed-auth limit or full queue); see Retry-After",
    502: "The worker failed",
    503: "Unavailable (no worker runs the service, or the database is unreachable)",
    504: "The worker did not answer in time",
}
_ERROR_REF = {"$ref": "#/components/schemas/ErrorBody"}
_ERROR_SCHEMA = {
    "title": "ErrorBody",
    "description": 'Every error answer: ``{"error": {"code": ..., "message": ...}}``.',
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message"],
            "properties": {"code": {"type": "string"}, "message": {"type": "string"}},
        }
    },
}
_SCHEMES = {
    "adminKey": {"type": "http", "scheme": "bearer", "description": "The admin key."},
    "workerCredential": {
        "type": "http",
        "scheme": "bearer",
        "description": "A worker's credential (from POST /api/worker/register).",
    },
    "apiKey": {
        "type": "http",
        "scheme": "bearer",
        "description": "A client API key (rma admin keys create).",
    },
}
_METHODS = ("get", "put", "post", "delete", "patch")


def error(status: int) -> dict[str, Any]:
    """One documented error answer."""
    resp: dict[str, Any] = {
        "description": _DESCRIPTIONS[status],
        "content": {"application/json": {"schema": _ERROR_REF}},
    }
    if status in (429, 503):
        resp["headers"] = {"Retry-After": {"schema": {"type": "string"}}}
    if status == 401:
        resp["headers"] = {"WWW-Authenticate": {"schema": {"type": "string"}}}
    return resp


def _errors_for(path: str, method: str, op: dict[str, Any]) -> tuple[set[int], str | None]:
    """The error statuses an operation can answer, and the credential it needs."""
    codes: set[int] = set()
    if "requestBody" in op:
        codes |= {400, 413, 422}
    if op.get("parameters"):
        codes.add(422)
    scheme = None
    if path.startswith("/api/admin/"):
        scheme = "adminKey"
        codes |= {401, 403, 429}
        if "{" in path:
            codes.add(404)
            if method != "get":
                codes.add(409)
    elif path == "/api/worker/register":
        codes |= {401, 403, 409, 422, 429}
    elif path.startswith("/api/worker/"):
        scheme = "workerCredential"
        codes |= {401, 403, 404, 409, 429}
    elif path == "/readyz":
        codes.add(503)
    return codes, scheme


def complete(schema: dict[str, Any]) -> dict[str, Any]:
    """Add the error answers and security requirements to FastAPI's schema (in place)."""
    components = schema.setdefault("components", {})
    components.setdefault("schemas", {})["ErrorBody"] = _ERROR_SCHEMA
    components["securitySchemes"] = _SCHEMES
    for path, item in schema.get("paths", {}).items():
        for method, op in item.items():
            if method not in _METHODS:
                continue
            codes, scheme = _errors_for(path, method, op)
            responses = op.setdefault("responses", {})
            for status in sorted(codes):
                responses[str(status)] = error(status)  # ours replace FastAPI's HTTPValidationError
            if scheme:
                op["security"] = [{scheme: []}]
    return schema


def install(app: FastAPI, extra: Callable[[], dict[str, Any]] | None = None) -> None:
    """Serve the completed schema; ``extra()`` gives more paths (the gateway's), per request."""
    base = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = complete(base())
        if extra is None:
            return app.openapi_schema
        schema = copy.copy(app.openapi_schema)
        schema["paths"] = {**extra(), **schema["paths"]}
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
