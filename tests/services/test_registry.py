"""The registry of built-in services, their settings, and the docs that describe them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from rma.services import BUILTIN, build_app, run_service
from rma.services.settings import ServiceSettings

DOCS = Path(__file__).parents[2] / "docs" / "services.md"


def test_builtin_names_the_seven_services() -> None:
    assert set(BUILTIN) == {"llm", "embeddings", "ner", "ocr", "doc", "rag", "notes"}


@pytest.mark.parametrize("call", [build_app, lambda n: run_service(n, "127.0.0.1", 0)])
def test_unknown_service_is_a_clear_value_error(call: object) -> None:
    with pytest.raises(ValueError, match=r"unknown built-in service 'nope'.*llm"):
        call("nope")  # type: ignore[operator]


def test_importing_the_services_loads_no_heavy_library() -> None:
    code = (
        "import sys, rma.services, rma.services.settings, rma.services._common\n"
        "import rma.services.llm, rma.services.ner, rma.services.embeddings, rma.services.ocr\n"
        "heavy = {'llama_cpp', 'spacy', 'torch', 'sentence_transformers', 'pytesseract'}\n"
        "print(sorted(heavy & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_every_setting_has_a_description() -> None:
    for name, field in ServiceSettings.model_fields.items():
        assert field.description, f"{name} has no description"


def test_settings_read_rma_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RMA_GATEWAY_URL", "http://gw.test:1")
    monkeypatch.setenv("RMA_API_KEY", "sk-test")
    monkeypatch.setenv("RMA_LLM_MODEL_PATH", "/models/x.gguf")
    settings = ServiceSettings()
    assert settings.gateway_url == "http://gw.test:1"
    assert settings.api_key is not None
    assert settings.api_key.get_secret_value() == "sk-test"
    assert str(settings.llm_model_path) == "/models/x.gguf"


def test_docs_cover_every_service_and_setting() -> None:
    text = DOCS.read_text()
    for name in BUILTIN:
        assert f"## `{name}`" in text, f"docs/services.md has no section for {name}"
    for field in ServiceSettings.model_fields:
        assert f"RMA_{field.upper()}" in text, f"docs/services.md omits RMA_{field.upper()}"
