"""The registry's index of who holds each service: it follows every way assignments change, so
the request path looks only at a service's holders."""

from __future__ import annotations

from rma.coordinator.registry import Registry, WorkerState
from rma.schemas.api import Capabilities, ServiceStatus
from rma.schemas.enums import Transport, WorkerStatus


def worker(wid: str, assignments: list[str], healthy: tuple[str, ...] = ()) -> WorkerState:
    caps = Capabilities(cpu_cores=2, memory_mb=4096, disk_free_mb=1000, os="linux", arch="x86_64")
    return WorkerState(
        id=wid, name=wid, status=WorkerStatus.ONLINE, tier=2, transport=Transport.DIRECT,
        capabilities=caps, labels={}, assignments=assignments,
        services={n: ServiceStatus(name=n, state="running", healthy=True) for n in healthy},
    )  # fmt: skip


def test_routable_follows_assignments_set_after_put() -> None:
    reg = Registry()
    a = worker("a", ["llm"], healthy=("llm", "embeddings"))
    reg.put(a)
    assert [w.id for w in reg.routable("llm")] == ["a"]
    assert reg.routable("embeddings") == []  # healthy but not assigned: a claim
    a.assignments = ["embeddings"]  # as the scheduler does
    assert reg.routable("llm") == []
    assert [w.id for w in reg.routable("embeddings")] == ["a"]


def test_a_replaced_state_leaves_no_trace_of_the_old_one() -> None:
    reg = Registry()
    old = worker("a", ["llm"], healthy=("llm",))
    reg.put(old)
    new = worker("a", ["ocr"], healthy=("ocr",))
    reg.put(new)
    assert reg.routable("llm") == []
    assert reg.routable("ocr") == [new]
    old.assignments = ["ocr", "llm"]  # a stale copy changing does not touch the index
    assert reg.routable("llm") == [] and reg.routable("ocr") == [new]


def test_only_holders_are_looked_at() -> None:
    """10,000 workers, one holder: routable() visits one state, not 10,000."""
    reg = Registry()
    for i in range(10_000):
        reg.put(worker(f"w{i}", ["embeddings"], healthy=("embeddings",)))
    reg.put(worker("the-one", ["llm"], healthy=("llm",)))
    looked: list[str] = []
    original = WorkerState.serves

    def counting(self: WorkerState, service: str) -> bool:
        looked.append(self.id)
        return original(self, service)

    try:
        WorkerState.serves = counting  # type: ignore[method-assign]
        assert [w.id for w in reg.routable("llm")] == ["the-one"]
    finally:
        WorkerState.serves = original  # type: ignore[method-assign]
    assert looked == ["the-one"]


def test_load_rebuilds_the_index() -> None:
    reg = Registry()
    reg.put(worker("a", ["llm"], healthy=("llm",)))
    reg.load([])
    assert reg.routable("llm") == [] and reg.all() == []
