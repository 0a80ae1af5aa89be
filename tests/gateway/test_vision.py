"""Image input in chat: routed only to a service whose catalog entry says the model sees images
(`vision`), and refused with a clear 400 for a model that does not."""

from __future__ import annotations

from typing import Any

CATALOG = """
[services.sighted]
tier = 3
kind = "openai"
models = ["llava:7b", "llama3.2:3b"]
vision = ["llava:7b"]
command = ["true"]
health = "/health"
replicas = 16

[services.blind]
description = "serves the same model name, but without its image projector"
tier = 3
kind = "openai"
models = ["llava:7b"]
command = ["true"]
health = "/health"
replicas = 16
"""

IMAGE = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}


def chat(model: str, with_image: bool) -> dict[str, Any]:
    content: Any = [{"type": "text", "text": "What is in this picture?"}]
    if with_image:
        content.append(IMAGE)
    return {"model": model, "messages": [{"role": "user", "content": content}]}


def test_images_go_only_to_a_model_that_declares_vision(pool_factory: Any, backends: Any) -> None:
    pool = pool_factory(catalog_text=CATALOG)
    pool.add_worker("eyes", {"sighted": backends("s").url})
    pool.add_worker("no-eyes", {"blind": backends("b").url})
    with pool.client() as c:
        served = set()
        for _ in range(12):
            r = c.post("/v1/chat/completions", json=chat("llava:7b", with_image=True))
            assert r.status_code == 200, r.text
            served.add(r.headers["x-rma-worker"])
        assert served == {"eyes"}
        text_only = {
            c.post("/v1/chat/completions", json=chat("llava:7b", with_image=False)).headers[
                "x-rma-worker"
            ]
            for _ in range(30)
        }
        assert text_only == {"eyes", "no-eyes"}  # without images, either serves it


def test_an_image_for_a_model_without_vision_is_a_clear_400(
    pool_factory: Any, backends: Any
) -> None:
    pool = pool_factory(catalog_text=CATALOG)
    pool.add_worker("eyes", {"sighted": backends("s").url})
    with pool.client() as c:
        r = c.post("/v1/chat/completions", json=chat("llama3.2:3b", with_image=True))
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["code"] == "model_lacks_vision"
        assert "'llama3.2:3b' takes no image input" in error["message"]
        assert "llava:7b" in error["message"]
        ok = c.post("/v1/chat/completions", json=chat("llama3.2:3b", with_image=False))
        assert ok.status_code == 200, ok.text


def test_vision_must_name_models_of_the_entry(tmp_path: Any) -> None:
    import pytest

    from rma.catalog import CatalogError, load_catalog

    bad = tmp_path / "catalog.toml"
    bad.write_text('[services.x]\nkind = "openai"\nmodels = ["a"]\nvision = ["b"]\n')
    with pytest.raises(CatalogError, match="vision lists models that are not in models: b"):
        load_catalog(bad)
