"""Shared service plumbing: /health readiness, the error shape, body limits, the gateway client."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

import httpx
import pytest
from pydantic import BaseModel

from rma.services._common import Gateway, ServiceError, create_service_app
from rma.services.settings import ServiceSettings


class Echo(BaseModel):
    text: str


def make_app(settings: ServiceSettings, load: Callable[[], None]):  # type: ignore[no-untyped-def]
    app, readiness = create_service_app("test", settings, load=load)

    @app.post("/echo")
    async def echo(body: Echo) -> dict[str, str]:
        readiness.check()
        return {"text": body.text}

    return app


async def test_health_is_503_while_loading_then_200(make_settings) -> None:  # type: ignore[no-untyped-def]
    release = threading.Event()
    app = make_app(make_settings(), load=lambda: release.wait(10) and None)
    transport = httpx.ASGITransport(app=app)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://t") as client,
    ):
        loading = await client.get("/health")
        assert loading.status_code == 503
        assert loading.json()["status"] == "loading"
        early = await client.post("/echo", json={"text": "hi"})
        assert early.status_code == 503
        assert early.json()["error"]["code"] == "not_ready"
        release.set()
        for _ in range(100):
            if (await client.get("/health")).status_code == 200:
                break
            await asyncio.sleep(0.02)
        assert (await client.get("/health")).json() == {"status": "ok", "service": "test"}
        assert (await client.post("/echo", json={"text": "hi"})).json() == {"text": "hi"}


async def test_health_reports_a_failed_load(make_settings) -> None:  # type: ignore[no-untyped-def]
    def fail() -> None:
        raise RuntimeError("no model here")

    app = make_app(make_settings(), load=fail)
    transport = httpx.ASGITransport(app=app)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://t") as client,
    ):
        for _ in range(100):
            body = (await client.get("/health")).json()
            if body["status"] != "loading":
                break
            await asyncio.sleep(0.02)
        assert body["status"] == "error"
        assert "no model here" in body["detail"]


@pytest.mark.parametrize(
    ("kwargs", "status", "code"),
    [
        ({"json": {"nope": 1}}, 422, "invalid_request"),
        ({"content": b"{not json", "headers": {"content-type": "application/json"}}, 422, None),
        ({"content": b"x" * 2048, "headers": {"content-type": "application/json"}}, 413, None),
    ],
)
async def test_client_mistakes_get_json_errors_never_500(  # type: ignore[no-untyped-def]
    make_settings, kwargs, status, code
) -> None:
    app = make_app(make_settings(max_request_mb=1 / 1024), load=lambda: None)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        response = await client.post("/echo", **kwargs)
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"code", "message"}
    if code:
        assert error["code"] == code


async def test_streamed_body_over_the_limit_is_413(make_settings) -> None:  # type: ignore[no-untyped-def]
    app = make_app(make_settings(max_request_mb=1 / 1024), load=lambda: None)

    async def chunks():  # type: ignore[no-untyped-def]
        for _ in range(4):
            yield b"x" * 512

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        response = await client.post("/echo", content=chunks())
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "too_large"


async def test_unknown_route_is_a_json_404(make_settings) -> None:  # type: ignore[no-untyped-def]
    app = make_app(make_settings(), load=lambda: None)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        response = await client.get("/nowhere")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"


async def test_gateway_sends_the_api_key_and_parses_openai_answers() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.path == "/v1/embeddings":
            data = [{"index": 1, "embedding": [0.0, 1.0]}, {"index": 0, "embedding": [1.0, 0.0]}]
            return httpx.Response(200, json={"data": data})
        choice = {"message": {"role": "assistant", "content": "Paris."}}
        return httpx.Response(200, json={"choices": [choice]})

    settings = ServiceSettings(gateway_url="http://gw.test", api_key="sk-1")
    gateway = Gateway(settings, transport=httpx.MockTransport(handler))
    assert await gateway.embed("m", ["a", "b"]) == [[1.0, 0.0], [0.0, 1.0]]
    assert await gateway.chat("m", [{"role": "user", "content": "?"}]) == "Paris."
    await gateway.aclose()
    assert all(r.headers["authorization"] == "Bearer sk-1" for r in seen)


@pytest.mark.parametrize(
    ("handler", "status"),
    [
        (lambda r: httpx.Response(503, json={"error": {"code": "no_worker"}}), 502),
        (lambda r: httpx.Response(200, text="not json"), 502),
    ],
)
async def test_gateway_failures_become_service_errors(handler, status) -> None:  # type: ignore[no-untyped-def]
    gateway = Gateway(ServiceSettings(), transport=httpx.MockTransport(handler))
    with pytest.raises(ServiceError) as info:
        await gateway.embed("m", ["a"])
    await gateway.aclose()
    assert info.value.status == status


async def test_unreachable_gateway_is_503() -> None:
    gateway = Gateway(ServiceSettings(gateway_url="http://127.0.0.1:9", gateway_timeout=2))
    with pytest.raises(ServiceError) as info:
        await gateway.chat("m", [])
    await gateway.aclose()
    assert info.value.status == 503
    assert info.value.code == "gateway_unreachable"


async def test_gateway_reads_the_key_file_at_each_call(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The agent rewrites the file when the worker re-joins; the service needs no restart."""
    seen: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("authorization"))
        return httpx.Response(200, json={"data": [{"index": 0, "embedding": [1.0]}]})

    key_file = tmp_path / "service.key"
    key_file.write_text("rma_key_one\n")
    settings = ServiceSettings(
        gateway_url="http://gw.test", api_key="sk-old", api_key_file=key_file
    )
    gateway = Gateway(settings, transport=httpx.MockTransport(handler))
    await gateway.embed("m", ["a"])
    key_file.write_text("rma_key_two\n")
    await gateway.embed("m", ["a"])
    await gateway.aclose()
    assert seen == ["Bearer rma_key_one", "Bearer rma_key_two"]
