"""The HTTP contract a fuzzer relies on: strict numbers, documented answers, honest ``Allow``.

Against a real coordinator process (the schemathesis run over all of it is
``tests/gateway/test_fuzz_api.py``).
"""

from __future__ import annotations

import httpx
import pytest


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/api/admin/keys", {"name": "k", "rpm": False}),
        ("/api/admin/keys", {"name": "k", "rpm": "5"}),
        ("/api/admin/tokens", {"ttl": True}),
        ("/api/admin/tokens", {"uses": False}),
    ],
)
def test_booleans_and_strings_are_not_numbers(coordinator_process, path, body) -> None:
    with coordinator_process.admin() as c:
        before = c.get(path).json()
        r = c.post(path, json=body)
        assert r.status_code == 422, r.text
        assert r.json()["error"]["code"] == "invalid"
        assert "must be a number" in r.json()["error"]["message"]
        assert c.get(path).json() == before  # nothing was created
        ok = c.post(path, json={k: 5 if k != "name" else "k" for k in body})
        assert ok.status_code == 201, ok.text


def test_a_register_with_a_boolean_core_count_is_refused(coordinator_process) -> None:
    caps = {"cpu_cores": True, "memory_mb": 4096, "docker": False}
    body = {"token": coordinator_process.token(), "name": "w", "capabilities": caps}
    r = httpx.post(coordinator_process.url + "/api/worker/register", json=body, timeout=10)
    assert r.status_code == 422, r.text
    caps["cpu_cores"] = 2.0  # an integral JSON number is an integer
    r = httpx.post(coordinator_process.url + "/api/worker/register", json=body, timeout=10)
    assert r.status_code == 201, r.text


def test_every_operation_documents_its_errors_and_the_gateway_is_in_the_schema(
    coordinator_process,
) -> None:
    schema = httpx.get(coordinator_process.url + "/openapi.json", timeout=10).json()
    paths = schema["paths"]
    for path in ("/v1/models", "/v1/chat/completions", "/v1/embeddings", "/v1/completions"):
        assert path in paths
    assert set(paths["/api/services/{service}/{path}"]) == {"get", "post", "put", "patch", "delete"}
    for path, item in paths.items():
        for method, op in item.items():
            codes = set(op["responses"])
            if path.startswith(("/api/admin/", "/v1/", "/api/services/")):
                assert {"401", "403", "429"} <= codes, (method, path, codes)
                assert op["security"], (method, path)
            if path.startswith("/api/worker/") and path != "/api/worker/register":
                assert {"401", "403", "429"} <= codes, (method, path, codes)
            if "requestBody" in op:
                assert {"400", "413", "422"} <= codes, (method, path, codes)
            if "{" in path and path.startswith("/api/admin/"):
                assert "404" in codes, (method, path, codes)
            for status, resp in op["responses"].items():
                if status.startswith(("4", "5")):
                    ref = resp["content"]["application/json"]["schema"]["$ref"]
                    assert ref == "#/components/schemas/ErrorBody"


def test_options_and_405_name_every_method(coordinator_process) -> None:
    with coordinator_process.admin() as c:
        r = c.options("/api/admin/keys")
        assert r.status_code == 204
        assert r.headers["allow"] == "GET, HEAD, POST, OPTIONS"
        r = c.put("/api/admin/keys")
        assert r.status_code == 405
        assert r.headers["allow"] == "GET, HEAD, POST, OPTIONS"
        assert r.json()["error"]["code"] == "method_not_allowed"
        r = c.options("/api/admin/workers/abc")
        assert r.headers["allow"] == "GET, HEAD, DELETE, OPTIONS"
        r = c.options("/api/services/echo/a/b")
        assert r.headers["allow"] == "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"
        assert c.options("/no/such/path").status_code == 404
