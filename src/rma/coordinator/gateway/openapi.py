"""The gateway's operations in ``/openapi.json`` (its routes are raw ASGI, unseen by FastAPI).

The request bodies are documented as loosely as the gateway reads them: an object with a
``model`` (the rest goes to the worker untouched).  ``model`` and ``service`` list what the pool
serves at the moment the schema is fetched (like ``GET /v1/models``); an empty pool documents
plain names.
"""

from __future__ import annotations

from typing import Any

from rma.coordinator.openapi import error

_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"
_SECURITY: list[dict[str, list[str]]] = [{"apiKey": []}]
_ANY_JSON: dict[str, Any] = {"type": "object", "additionalProperties": True}
_ANSWER = {
    "description": "The worker's answer, relayed byte for byte (SSE when streamed)",
    "content": {
        "application/json": {"schema": _ANY_JSON},
        "text/event-stream": {"schema": {"type": "string"}},
    },
}
_SERVICE_METHODS = ("get", "post", "put", "patch", "delete")
#: What ``/api/services/*`` accepts (HEAD comes with GET; OPTIONS is answered by the coordinator).
SERVICE_METHODS = [m.upper() for m in _SERVICE_METHODS]


def _responses(ok: dict[str, Any], *codes: int) -> dict[str, Any]:
    return {"200": ok, **{str(c): error(c) for c in sorted(codes)}}


def _name(values: list[str], what: str) -> dict[str, Any]:
    if values:
        return {"type": "string", "enum": sorted(values), "description": what}
    return {"type": "string", "pattern": _NAME, "description": what}


def paths(
    models: list[str], services: list[str], endpoints: dict[str, list[str]] | None = None
) -> dict[str, Any]:
    """Path items for ``/v1/*`` and ``/api/services/*``; ``endpoints``: the catalog's declared
    ones (``/v1/rerank``, ``/v1/responses/*``) -> the models served there now."""
    model_list = {
        "description": "The models of healthy services",
        "content": {"application/json": {"schema": _ANY_JSON}},
    }
    body = {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["model"],
                    "properties": {"model": _name(models, "A model that the pool serves.")},
                    "additionalProperties": True,
                }
            }
        },
    }
    forwarded = (400, 401, 403, 404, 413, 422, 429, 502, 503, 504)
    out: dict[str, Any] = {
        "/v1/models": {
            "get": {
                "tags": ["gateway"],
                "summary": "List the models of healthy services",
                "operationId": "gateway_models",
                "security": _SECURITY,
                "responses": _responses(model_list, 401, 403, 429),
            }
        },
        "/v1/models/{model}": {
            "get": {
                "tags": ["gateway"],
                "summary": "One model",
                "operationId": "gateway_model",
                "security": _SECURITY,
                "parameters": [
                    {"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}
                ],
                "responses": _responses(model_list, 401, 403, 404, 429),
            }
        },
    }
    for path, summary in (
        ("/v1/chat/completions", "Chat completion (stream: true -> SSE)"),
        ("/v1/completions", "Text completion (stream: true -> SSE)"),
        ("/v1/embeddings", "Embeddings"),
    ):
        out[path] = {
            "post": {
                "tags": ["gateway"],
                "summary": summary,
                "operationId": "gateway" + path.replace("/", "_"),
                "security": _SECURITY,
                "requestBody": body,
                "responses": _responses(_ANSWER, *forwarded),
            }
        }
    for endpoint, served in (endpoints or {}).items():
        _add_endpoint(out, endpoint, served, forwarded)
    service = {
        "name": "service",
        "in": "path",
        "required": True,
        "schema": _name(services, "A service of the catalog that the pool runs."),
    }
    rest = {"name": "path", "in": "path", "required": True, "schema": {"type": "string"}}
    item: dict[str, Any] = {}
    for method in _SERVICE_METHODS:
        op: dict[str, Any] = {
            "tags": ["gateway"],
            "summary": f"{method.upper()} on the service (any path, relayed to a worker)",
            "operationId": f"gateway_service_{method}",
            "security": _SECURITY,
            "parameters": [service, rest],
            "responses": {
                "200": {
                    "description": "The service's answer, relayed byte for byte",
                    "content": {"*/*": {"schema": {}}},
                },
                "default": {
                    "description": "The service's own status codes, or the gateway's errors",
                    "content": {"*/*": {"schema": {}}},
                },
                **{str(c): error(c) for c in forwarded},
            },
        }
        if method in ("post", "put", "patch"):
            op["requestBody"] = {"content": {"*/*": {"schema": {}}}}
        item[method] = op
    out["/api/services/{service}/{path}"] = item
    return out


def _add_endpoint(
    out: dict[str, Any], endpoint: str, models: list[str], forwarded: tuple[int, ...]
) -> None:
    """``POST`` on a declared endpoint: a JSON or form body with a ``model``."""
    schema = {
        "type": "object",
        "required": ["model"],
        "properties": {"model": _name(models, "A model whose service declares this endpoint.")},
        "additionalProperties": True,
    }
    op: dict[str, Any] = {
        "tags": ["gateway"],
        "summary": f"{endpoint} (a catalog endpoint, routed by model)",
        "operationId": "gateway" + endpoint.replace("/*", "_any").replace("/", "_"),
        "security": _SECURITY,
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": schema},
                "multipart/form-data": {"schema": schema},
            },
        },
        "responses": _responses(_ANSWER, *forwarded),
    }
    if endpoint.endswith("/*"):
        rest = {"name": "path", "in": "path", "required": True, "schema": {"type": "string"}}
        out[endpoint[:-2]] = {"post": op}
        out[endpoint[:-2] + "/{path}"] = {
            "post": {**op, "operationId": op["operationId"] + "_path", "parameters": [rest]}
        }
    else:
        out[endpoint] = {"post": op}
