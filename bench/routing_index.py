"""What choosing a worker costs as the pool grows: the gateway's per-request lookup.

``python -m bench.routing_index [--sizes 10,1000,10000] [--repeat 20000]`` fills a real
:class:`rma.coordinator.registry.Registry` with N online workers that hold another service and one
worker that holds the requested one, then times the two calls the gateway makes for every
request: ``Registry.routable(service)`` and ``Balancer.workers_for(service)``. Before the
registry indexed its workers by service, both scanned every worker (O(N)); now they look only at
the service's holders, so the time should not move with N. Prints one JSON line per size.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

from rma.coordinator.gateway.balancer import Balancer
from rma.coordinator.registry import Registry, WorkerState
from rma.schemas.api import Capabilities, ServiceStatus
from rma.schemas.enums import Transport, WorkerStatus

CAPS = Capabilities(cpu_cores=2, memory_mb=4096, disk_free_mb=1000, os="linux", arch="x86_64")


def state(wid: str, service: str) -> WorkerState:
    return WorkerState(
        id=wid, name=wid, status=WorkerStatus.ONLINE, tier=2, transport=Transport.DIRECT,
        capabilities=CAPS, labels={}, assignments=[service],
        services={service: ServiceStatus(name=service, state="running", healthy=True)},
    )  # fmt: skip


def per_call_us(call: Callable[[], object], repeat: int) -> float:
    """The best of five runs of ``repeat`` calls, per call, in microseconds."""
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(repeat):
            call()
        best = min(best, (time.perf_counter() - start) / repeat)
    return best * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10,1000,10000")
    parser.add_argument("--repeat", type=int, default=20000)
    args = parser.parse_args()
    for n in (int(x) for x in args.sizes.split(",")):
        reg = Registry()
        for i in range(n):
            reg.put(state(f"w{i}", "embeddings"))
        reg.put(state("chat-worker", "llm"))
        balancer = Balancer(
            reg, capacity=8, queue_size=0, queue_timeout=1, cooldown_base=1, cooldown_max=1
        )
        row = {
            "workers": n + 1,
            "routable_us": round(per_call_us(lambda r=reg: r.routable("llm"), args.repeat), 3),
            "workers_for_us": round(
                per_call_us(lambda b=balancer: b.workers_for("llm"), args.repeat), 3
            ),
        }
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
