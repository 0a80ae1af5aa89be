"""The donor's policy on its own: what it runs, what it refuses, and why (no I/O)."""

from __future__ import annotations

import pytest

from rma.agent.policy import (
    Limits,
    Policy,
    bind_mounts,
    clip_capabilities,
    coordinator_problem,
    is_loopback,
)
from rma.catalog import load_catalog
from rma.schemas.api import Capabilities, GpuInfo, ServiceSpec
from rma.settings import WorkerSettings, parse_size

CATALOG = load_catalog()  # the built-in one


def spec(name: str, **fields: object) -> ServiceSpec:
    return ServiceSpec.model_validate({"name": name, **fields})


def same(name: str, **changes: object) -> ServiceSpec:
    return CATALOG[name].model_copy(update=changes)


def test_the_donors_own_definition_runs() -> None:
    verdict = Policy(CATALOG).check([same("redis")])
    assert verdict.refused == {}
    assert verdict.accepted == [CATALOG["redis"]]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("command", ["sh", "-c", "touch /tmp/owned"]),
        ("args", ["--evil"]),
        ("image", "attacker/redis:latest"),
        ("env", {"LD_PRELOAD": "/tmp/evil.so"}),
        ("volumes", {"/data": "/etc"}),
    ],
)
def test_a_changed_definition_is_refused(field: str, value: object) -> None:
    verdict = Policy(CATALOG).check([same("redis", **{field: value})])
    assert verdict.accepted == []
    assert field in verdict.refused["redis"]
    assert "--trust-coordinator-catalog" in verdict.refused["redis"]


def test_an_unknown_service_is_refused() -> None:
    evil = spec("evil", command=["sh", "-c", "touch /tmp/owned"])
    verdict = Policy(CATALOG).check([evil, same("redis")])
    assert [s.name for s in verdict.accepted] == ["redis"]
    assert "not defined in this donor's catalog" in verdict.refused["evil"]


def test_trusting_the_coordinator_runs_its_definition_but_never_a_bind_mount() -> None:
    policy = Policy(CATALOG, trust_coordinator_catalog=True)
    evil = spec("evil", command=["{python}", "-m", "http.server"])
    mount = spec("web", image="busybox", volumes={"/data": "/home/donor"})
    named = spec("kept", image="busybox", volumes={"/data": "kept-data"})
    verdict = policy.check([evil, mount, named])
    assert [s.name for s in verdict.accepted] == ["evil", "kept"]
    assert verdict.accepted[0].command == ["{python}", "-m", "http.server"]
    assert "/home/donor" in verdict.refused["web"]
    assert bind_mounts(mount) == ["/home/donor"]
    assert bind_mounts(named) == []
    for path in ("./x", "~/x", "/", "..", "C:\\x"):
        assert bind_mounts(spec("v", volumes={"/data": path})) == [path]


def test_the_allow_list() -> None:
    policy = Policy(CATALOG, services=["redis"])
    verdict = policy.check([same("redis"), same("postgres")])
    assert [s.name for s in verdict.accepted] == ["redis"]
    assert "--services" in verdict.refused["postgres"]
    assert policy.runnable(["redis", "postgres", "nope"]) == ["redis"]


def test_limits_refuse_what_does_not_fit_alone_or_together() -> None:
    policy = Policy(CATALOG, limits=Limits(memory_mb=600, vram_mb=0))
    # postgres 512 MB fits; redis 256 MB more does not; neo4j 1024 MB never; vllm needs a GPU
    verdict = policy.check([same("postgres"), same("redis"), same("neo4j"), same("vllm")])
    assert [s.name for s in verdict.accepted] == ["postgres"]
    assert "with the other services" in verdict.refused["redis"]
    assert "--max-memory 600" in verdict.refused["redis"]
    assert "--max-memory 600" in verdict.refused["neo4j"]
    assert "vllm" in verdict.refused
    no_gpu = Policy(CATALOG, limits=Limits(vram_mb=0)).check([same("vllm"), same("ollama")])
    assert no_gpu.accepted == []
    assert "--max-vram 0" in no_gpu.refused["vllm"]
    assert policy.runnable(["postgres", "redis", "neo4j", "vllm"]) == ["postgres", "redis"]


def test_capabilities_are_clipped_to_the_limits() -> None:
    caps = Capabilities(
        cpu_cores=16,
        memory_mb=65536,
        memory_available_mb=30000,
        gpus=[GpuInfo(name="a", memory_mb=24576), GpuInfo(name="b", memory_mb=24576)],
    )
    clipped = clip_capabilities(caps, Limits(cpu=2.5, memory_mb=4096, vram_mb=30000))
    assert clipped.cpu_cores == 2
    assert clipped.memory_mb == 4096
    assert clipped.memory_available_mb == 4096
    assert [g.memory_mb for g in clipped.gpus] == [24576, 30000 - 24576]
    assert clip_capabilities(caps, Limits(vram_mb=0)).gpus == []
    assert clip_capabilities(caps, Limits()) == caps
    small = Capabilities(cpu_cores=2, memory_mb=1024)
    assert clip_capabilities(small, Limits(cpu=8, memory_mb=4096)) == small


@pytest.mark.parametrize(
    ("text", "mb"),
    [("4G", 4096), ("512M", 512), ("512m", 512), ("1.5g", 1536), ("2048", 2048),
     ("1GiB", 1024), ("2 GB", 2048), ("1T", 1 << 20), ("4096K", 4)],
)  # fmt: skip
def test_sizes(text: str, mb: int) -> None:
    assert parse_size(text) == mb


@pytest.mark.parametrize("text", ["", "lots", "-1G", "4X", "100K", "0"])
def test_bad_sizes_say_what_a_size_is(text: str) -> None:
    with pytest.raises(ValueError, match="size|megabyte"):
        parse_size(text)


def test_settings_read_the_limits_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RMA_SERVICES", "llm, embeddings")
    monkeypatch.setenv("RMA_MAX_MEMORY", "4G")
    monkeypatch.setenv("RMA_MAX_VRAM", "0")
    monkeypatch.setenv("RMA_MAX_CPU", "1.5")
    monkeypatch.setenv("RMA_CA_HASH", "SHA256:" + "AB" * 32)
    s = WorkerSettings()
    assert s.services == ["llm", "embeddings"]
    assert (s.max_memory, s.max_vram, s.max_cpu) == (4096, 0, 1.5)
    assert s.ca_hash == "sha256:" + "ab" * 32
    with pytest.raises(ValueError, match="64 hex"):
        WorkerSettings(ca_hash="sha256:abc")


@pytest.mark.parametrize(
    ("url", "insecure", "refused"),
    [
        ("http://127.0.0.1:8420", False, False),
        ("http://127.0.0.2:8420", False, False),
        ("http://localhost:8420", False, False),
        ("http://[::1]:8420", False, False),
        ("https://pool.example.org", False, False),
        ("http://192.0.2.1:8420", False, True),
        ("http://pool.example.org", False, True),
        ("http://localhost.example.org", False, True),
        ("http://10.0.0.5:8420", True, False),
        ("ftp://127.0.0.1", True, True),
    ],
)
def test_plain_http_only_to_this_machine(url: str, insecure: bool, refused: bool) -> None:
    problem = coordinator_problem(url, insecure)
    assert (problem is not None) is refused, problem
    if refused and url.startswith("http://"):
        assert problem is not None and "--insecure" in problem


def test_loopback_names() -> None:
    assert is_loopback("127.9.9.9") and is_loopback("::1") and is_loopback("LOCALHOST")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.0.2.1")


def test_a_pin_needs_https() -> None:
    problem = coordinator_problem("http://127.0.0.1:8420", False, pinned=True)
    assert problem is not None and "https://" in problem
    assert coordinator_problem("https://127.0.0.1:8420", False, pinned=True) is None


def test_the_join_line() -> None:
    from rma.pinning import join_command, normalize

    pin = normalize("AB:" * 31 + "AB")
    assert pin == "sha256:" + "ab" * 32
    assert join_command("https://pool.example.org", "rma_join_a.b", pin) == (
        "rma worker join --coordinator https://pool.example.org --token rma_join_a.b "
        f"--ca-hash {pin}"
    )
    assert join_command("http://127.0.0.1:8420", "t", None) == (
        "rma worker join --coordinator http://127.0.0.1:8420 --token t"
    )
    # no TLS to another machine: the line says so rather than fail on the donor's side
    assert join_command("http://10.0.0.2:8420", "t", None).endswith(" --insecure")


def test_a_name_assigned_twice_counts_once() -> None:
    policy = Policy(CATALOG, limits=Limits(memory_mb=300))
    evil = same("redis", command=["sh", "-c", "touch /tmp/owned"])
    verdict = policy.check([same("redis"), same("redis"), evil])
    assert verdict.accepted == [CATALOG["redis"]]
    assert verdict.refused == {}
