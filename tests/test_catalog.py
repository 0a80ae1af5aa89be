"""The service catalog: the built-in file, the operator's overrides, tiers and assignment."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from rma.catalog import CatalogError, TierPolicy, TierRefused, assign, fits, load_catalog
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


def test_fits() -> None:
    gpu_svc = spec("g", gpu=True, resources={"vram_mb": 8000})
    assert not fits(gpu_svc, caps(), {})
    assert not fits(gpu_svc, caps(gpus=[{"name": "x", "memory_mb": 6000}]), {})
    assert fits(gpu_svc, caps(gpus=[{"name": "x", "memory_mb": 9000}]), {})
    big = spec("b", resources={"memory_mb": 7000})
    assert not fits(big, caps(), {})  # 80 % of 8192 MB is the pool's share
    labelled = spec("l", labels={"zone": "eu"})
    assert fits(labelled, caps(), {"zone": "eu"})
    assert not fits(labelled, caps(), {"zone": "us"})
    assert not fits(spec("a"), caps(), {"rma.services": "b, c"})
    assert fits(spec("c"), caps(), {"rma.services": "b, c"})


CATALOG = {
    s.name: s
    for s in [
        spec("t2-everywhere", tier=2, resources={"memory_mb": 1000}),
        spec("t2-one", tier=2, replicas=1, resources={"memory_mb": 1000}),
        spec("t3-db", tier=3, replicas=1, resources={"memory_mb": 500}),
        spec("t1-gpu", tier=1, gpu=True, resources={"vram_mb": 8000}),
        spec("t2-eu", tier=2, labels={"zone": "eu"}),
    ]
}


def run(c: Capabilities, tier: int, replicas: dict[str, int] | None = None, **kw: Any) -> list[str]:
    return assign(
        tier=tier, caps=c, labels=kw.pop("labels", {}), catalog=CATALOG,
        replicas=replicas or {}, **kw,
    )  # fmt: skip


def test_assignment_own_tier_lower_tiers_when_short() -> None:
    assert sorted(run(caps(), 2)) == ["t2-everywhere", "t2-one", "t3-db"]
    # the replica-limited ones are taken elsewhere already: only the every-worker service
    full = {"t2-one": 1, "t3-db": 1, "t2-everywhere": 5}
    assert run(caps(), 2, full) == ["t2-everywhere"]
    # a data worker never gets a tier-2 service
    assert run(caps(cpu_cores=1, memory_mb=3000), 3) == ["t3-db"]


def test_assignment_labels_runnable_and_resources() -> None:
    assert "t2-eu" in run(caps(), 2, labels={"zone": "eu"})
    assert run(caps(), 2, runnable=["t2-one"]) == ["t2-one"]
    # 80 % of 2000 MB = 1600 MB: room for one 1000 MB service and the 500 MB database
    small = run(caps(memory_mb=2000), 2)
    assert len([n for n in small if n.startswith("t2-")]) == 1
    assert "t3-db" in small


def test_assignment_gpu_worker_gets_gpu_services_first() -> None:
    gpu = caps(memory_mb=32000, gpus=[{"name": "x", "memory_mb": 12000}])
    names = run(gpu, 1)
    assert names[0] == "t1-gpu"
    assert "t2-one" in names  # short of replicas: a tier-1 worker helps out
    assert "t2-everywhere" in names  # nobody runs it yet
    # once a tier-2 worker runs an every-worker service, GPU workers leave it to them
    assert "t2-everywhere" not in run(gpu, 1, {"t2-everywhere": 1})


def test_assignment_keeps_what_the_worker_had() -> None:
    had = run(caps(), 2, {"t2-one": 1}, current=["t2-one"])
    assert "t2-one" in had  # counted elsewhere, but it is this worker's already: no flapping


def test_assignment_prefers_the_service_with_fewest_replicas() -> None:
    cat = {
        s.name: s
        for s in [
            spec("a", tier=2, replicas=3, resources={"memory_mb": 3000}),
            spec("b", tier=2, replicas=3, resources={"memory_mb": 3000}),
        ]
    }
    names = assign(
        tier=2, caps=caps(memory_mb=4096), labels={}, catalog=cat, replicas={"a": 2, "b": 0}
    )
    assert names == ["b"]
