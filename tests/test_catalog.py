"""The service catalog: the built-in file, the operator's overrides and tiers.

Placement is the scheduler's: tests/coordinator/scheduler/."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from rma.catalog import CatalogError, TierPolicy, TierRefused, load_catalog
from rma.schemas.api import Capabilities, ServiceSpec
from rma.schemas.enums import Tier

BUILTIN = {
    "vllm", "ollama", "llm", "embeddings", "ocr", "ner", "doc", "rag", "notes",
    "postgres", "redis", "chromadb", "neo4j",
}  # fmt: skip


def caps(**kw: Any) -> Capabilities:
    return Capabilities.model_validate({"cpu_cores": 4, "memory_mb": 8192, **kw})


def spec(name: str, **kw: Any) -> ServiceSpec:
    return ServiceSpec.model_validate({"name": name, **kw})


def test_builtin_catalog_has_every_service_with_valid_entries() -> None:
    cat = load_catalog()
    assert set(cat) >= BUILTIN
    for s in cat.values():
        assert s.image or s.command, s.name
        if s.kind == "openai":
            assert s.models, s.name
    assert {s.tier for s in cat.values()} == {1, 2, 3}
    assert cat.service_for_model("smollm2-135m") == "llm"
    assert cat.service_for_model("nope") is None


def test_operator_file_adds_and_overrides(tmp_path: Path) -> None:
    f = tmp_path / "catalog.toml"
    f.write_text(
        "[services.llm]\nreplicas = 2\n[services.llm.resources]\nmemory_mb = 2048\n"
        '[services.whisper]\ntier = 1\ngpu = true\nimage = "w:1"\n'
        "[services.whisper.resources]\nvram_mb = 4096\n"
    )
    cat = load_catalog(f)
    llm = cat["llm"]
    assert llm.replicas == 2
    assert llm.resources.memory_mb == 2048
    assert llm.resources.cpu_cores == 1
    assert llm.models == ["smollm2-135m"]
    assert cat["whisper"].gpu
    assert cat["whisper"].resources.vram_mb == 4096
    assert set(cat) == BUILTIN | {"whisper"}


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("not = [toml", "not valid TOML"),
        ("services = 3", "must be a table"),
        ("[services]\nx = 1", "must be a table"),
        ("[services.x]\ntier = 7", "service 'x': tier"),
        ("[services.x]\nkind = 'ftp'", "service 'x': kind"),
        ("[services.x]\nsurprise = 1", "service 'x': surprise"),
        ("[services.llm]\nport = 0", "service 'llm': port"),
    ],
)
def test_bad_operator_files_are_clear_errors(tmp_path: Path, content: str, message: str) -> None:
    f = tmp_path / "catalog.toml"
    f.write_text(content)
    with pytest.raises(CatalogError, match=message.replace("(", r"\(")):
        load_catalog(f)


def test_missing_operator_file(tmp_path: Path) -> None:
    with pytest.raises(CatalogError, match="cannot read catalog"):
        load_catalog(tmp_path / "nope.toml")


@pytest.mark.parametrize(
    ("c", "tier"),
    [
        (caps(gpus=[{"name": "RTX 4090", "memory_mb": 24564}]), Tier.GPU),
        (caps(gpus=[{"name": "small", "memory_mb": 4096}]), Tier.SERVICE),  # too little VRAM
        (caps(), Tier.SERVICE),
        (caps(cpu_cores=1), Tier.DATA),
        (caps(memory_mb=2048), Tier.DATA),
    ],
)
def test_tier_policy(c: Capabilities, tier: Tier) -> None:
    assert TierPolicy().tier_for(c) is tier


def test_tier_refusal_says_why() -> None:
    with pytest.raises(TierRefused, match="1000 MB of RAM.*needs 2048 MB"):
        TierPolicy().tier_for(caps(memory_mb=1000))
    assert TierPolicy(data_min_memory_mb=512).tier_for(caps(memory_mb=1000)) is Tier.DATA


def test_several_services_may_list_one_model(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text(
        '[services.llm2]\nkind = "openai"\nmodels = ["smollm2-135m"]\ncommand = ["true"]\n'
    )
    cat = load_catalog(f)
    assert cat.services_for_model("smollm2-135m") == ["llm", "llm2"]
    assert cat.service_for_model("smollm2-135m") == "llm"
    assert cat.services_for_model("nope") == []


def test_endpoints_route_a_path_to_the_services_declaring_it(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text(
        '[services.rerank]\nkind = "openai"\nmodels = ["bge"]\ncommand = ["true"]\n'
        'endpoints = ["/v1/rerank/", "/v1/rerank", "/v1/responses/*"]\n'
        '[services.whisper]\nkind = "http"\nmodels = ["whisper-1"]\ncommand = ["true"]\n'
        'endpoints = ["/v1/audio/transcriptions"]\n'
    )
    cat = load_catalog(f)
    assert cat["rerank"].endpoints == ["/v1/rerank", "/v1/responses/*"]  # normalized, deduped
    assert cat.services_for_endpoint("/v1/rerank") == ["rerank"]
    assert cat.services_for_endpoint("/v1/rerank/") == ["rerank"]
    assert cat.services_for_endpoint("/v1/responses") == ["rerank"]
    assert cat.services_for_endpoint("/v1/responses/r_1/cancel") == ["rerank"]
    assert cat.services_for_endpoint("/v1/responsesX") == []
    assert cat.services_for_endpoint("/v1/rerank/more") == []
    assert cat.services_for_endpoint("/v1/audio/transcriptions") == ["whisper"]
    assert cat.services_for_endpoint("/v1/chat/completions") == []
    assert cat.endpoints() == {
        "/v1/audio/transcriptions": ["whisper"],
        "/v1/rerank": ["rerank"],
        "/v1/responses/*": ["rerank"],
    }
    assert load_catalog().endpoints() == {}  # the built-in services declare none


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ('models = ["m"]\nendpoints = ["rerank"]', "a path under /v1/"),
        ('models = ["m"]\nendpoints = ["/api/rerank"]', "a path under /v1/"),
        ('models = ["m"]\nendpoints = ["/v1/../admin"]', "a path under /v1/"),
        ('models = ["m"]\nendpoints = ["/v1/a b"]', "a path under /v1/"),
        ('models = ["m"]\nendpoints = ["/v1/*"]', "a path under /v1/"),
        ('models = ["m"]\nendpoints = ["/v1/models"]', "the gateway's own route"),
        ('models = ["m"]\nendpoints = ["/v1/models/*"]', "the gateway's own route"),
        ('endpoints = ["/v1/rerank"]', "endpoints need models"),
        ('kind = "tcp"\nmodels = ["m"]\nendpoints = ["/v1/rerank"]', 'kind = "tcp"'),
    ],
)
def test_bad_endpoints_are_clear_errors(tmp_path: Path, entry: str, message: str) -> None:
    f = tmp_path / "catalog.toml"
    f.write_text(f'[services.x]\ncommand = ["true"]\n{entry}\n')
    with pytest.raises(CatalogError, match=f"service 'x': endpoints: .*{re.escape(message)}"):
        load_catalog(f)
