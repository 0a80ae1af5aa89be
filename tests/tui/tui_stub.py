"""A fixed dataset and a client stub for the dashboard's rendering tests and its screenshots.

The stub implements the same async methods as :class:`rma.client.CoordinatorClient` and answers
from fixed data, so snapshots are the same on every run.  It is for *rendering* only: the Pilot
tests in ``test_live.py`` drive the app against a real coordinator.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

from rma.schemas.api import CreditBalance, EventPublic, TokenPublic, WorkerPublic
from rma.tui.history import History

NOW = datetime(2025, 6, 1, 12, 0, 0, tzinfo=UTC)


def frozen_clock() -> datetime:
    return NOW


def _ago(seconds: float) -> str:
    return (NOW - timedelta(seconds=seconds)).isoformat()


def _svc(name: str, healthy: bool = True, inflight: int = 0, state: str = "running") -> dict:
    return {"name": name, "state": state, "healthy": healthy, "inflight": inflight}


def _worker(
    wid: str,
    name: str,
    status: str,
    tier: int,
    *,
    services: list[dict],
    load: dict,
    beat: float | None,
    transport: str = "tunnel",
    cores: int = 8,
    mem_gb: int = 16,
    gpus: list[dict] | None = None,
    labels: dict[str, str] | None = None,
    joined: float = 86400,
    owner: str = "",
    trust: tuple[float, int, int] = (0.5, 0, 0),
    quarantined: bool = False,
) -> WorkerPublic:
    reputation, verified, disagreements = trust
    return WorkerPublic.model_validate(
        {
            "id": wid,
            "name": name,
            "status": status,
            "tier": tier,
            "tier_name": {1: "gpu", 2: "service", 3: "data"}[tier],
            "capabilities": {
                "cpu_cores": cores,
                "memory_mb": mem_gb * 1024,
                "disk_free_mb": 200 * 1024,
                "gpus": gpus or [],
                "docker": True,
                "os": "linux",
                "arch": "x86_64",
            },
            "labels": labels or {},
            "owner": owner,
            "reputation": reputation,
            "verified": verified,
            "disagreements": disagreements,
            "quarantined": quarantined,
            "services": services,
            "assignments": [s["name"] for s in services],
            "load": load,
            "transport": transport,
            "trusted": False,
            "version": "0.1.0",
            "endpoint": None,
            "registered_at": _ago(joined),
            "last_heartbeat_at": None if beat is None else _ago(beat),
        }
    )


WORKERS = [
    _worker(
        "a1b2c3d4e5f60718",
        "gpu-box-01",
        "online",
        1,
        services=[_svc("vllm", inflight=3), _svc("embeddings", inflight=1)],
        load={"cpu_percent": 42, "memory_percent": 61, "gpu_percent": 78},
        beat=4,
        cores=16,
        mem_gb=64,
        gpus=[{"name": "RTX 4090", "memory_mb": 24576}],
        labels={"zone": "eu", "owner": "alice"},
        joined=3 * 86400,
        trust=(0.97, 310, 8),
    ),
    _worker(
        "b2c3d4e5f6071829",
        "gamer-pc",
        "online",
        1,
        services=[_svc("ollama", healthy=False, state="unhealthy")],
        load={"cpu_percent": 12, "memory_percent": 35, "gpu_percent": 96},
        beat=12,
        cores=12,
        mem_gb=32,
        gpus=[{"name": "RTX 3080", "memory_mb": 10240}],
        labels={"zone": "us"},
        owner="bob",
        trust=(0.21, 12, 9),
        quarantined=True,
    ),
    _worker(
        "c3d4e5f60718293a",
        "laptop-ana",
        "online",
        2,
        services=[_svc("ocr", inflight=1), _svc("ner")],
        load={"cpu_percent": 18, "memory_percent": 47},
        beat=2,
        transport="direct",
        owner="ana",
        trust=(0.5, 0, 0),
    ),
    _worker(
        "d4e5f60718293a4b",
        "homeserver",
        "draining",
        2,
        services=[_svc("rag", inflight=2), _svc("llm")],
        load={"cpu_percent": 71, "memory_percent": 83},
        beat=9,
        labels={"zone": "eu"},
        owner="alice",
        trust=(0.62, 24, 9),
    ),
    _worker(
        "e5f60718293a4b5c",
        "pi-cluster-3",
        "offline",
        3,
        services=[_svc("postgres", healthy=False, state="running")],
        load={"cpu_percent": 5, "memory_percent": 40},
        beat=190,
        cores=4,
        mem_gb=4,
    ),
    _worker(
        "f60718293a4b5c6d",
        "old-nuc",
        "removed",
        3,
        services=[],
        load={},
        beat=7200,
        cores=4,
        mem_gb=8,
    ),
]

_CATALOG = [
    ("vllm", 1, "openai", 0),
    ("ollama", 1, "http", 0),
    ("llm", 2, "openai", 2),
    ("embeddings", 2, "openai", 0),
    ("ocr", 2, "http", 0),
    ("ner", 2, "http", 0),
    ("rag", 2, "http", 0),
    ("postgres", 3, "tcp", 1),
    ("redis", 3, "tcp", 1),
]
_HEALTHY = {"vllm": 1, "llm": 1, "embeddings": 1, "ocr": 1, "ner": 1, "rag": 1}
_ASSIGNED = {"vllm": 1, "ollama": 1, "llm": 1, "embeddings": 1, "ocr": 1, "ner": 1, "rag": 1}
_ASSIGNED["postgres"] = 1
_QUEUED = {"vllm": 4, "llm": 0}

_INFLIGHT = {"vllm": 3, "embeddings": 1, "ocr": 1, "rag": 2}
_SCALING = {
    "vllm": "vllm scaled up to 2 replicas: in flight per healthy replica 3.5 above 2 for 60 s",
    "embeddings": "embeddings scaled down to 1 replicas: quiet for 300 s",
}
#: A data service's holder (none healthy: pi-cluster-3 is offline), connections and last backup
#: (redis: not wanted, so not listed).
_DATA: dict[str, dict[str, Any]] = {
    "postgres": {
        "holder": None,
        "connections": 0,
        "last_backup": {"at": (NOW - timedelta(minutes=3)).isoformat(), "size": 49_356},
    }
}
#: ``GET /api/admin/services``: the scheduler's view.
SERVICES: list[dict[str, Any]] = [
    {
        "name": name,
        "tier": tier,
        "replicas": wanted,
        "max_replicas": None,
        "priority": 0,
        "wanted": 2 if name == "vllm" else wanted,
        "assigned": _ASSIGNED.get(name, 0),
        "healthy": _HEALTHY.get(name, 0),
        "inflight": _INFLIGHT.get(name, 0),
        "queued": _QUEUED.get(name, 0),
        "last_scaling_event": _SCALING.get(name),
        **_DATA.get(name, {}),
    }
    for name, tier, kind, wanted in _CATALOG
    if kind != "tcp" or name in _DATA  # the coordinator lists only the data services it wants
]

STATS: dict[str, Any] = {
    "version": "0.1.0",
    "uptime_s": 3 * 86400 + 7260,
    "workers": {
        "total": 6,
        "by_status": {"online": 3, "offline": 1, "draining": 1, "left": 0, "removed": 1},
        "by_tier": {"gpu": 2, "service": 2, "data": 0},
    },
    "services": [
        {
            "name": name,
            "tier": tier,
            "kind": kind,
            "wanted": wanted,
            "assigned": _ASSIGNED.get(name, 0),
            "healthy": _HEALTHY.get(name, 0),
            **({"queued": _QUEUED[name]} if name in _QUEUED else {}),
        }
        for name, tier, kind, wanted in _CATALOG
    ],
    "usage": {
        "by_service": [
            {
                "service": "vllm",
                "requests": 5120,
                "errors": 12,
                "tokens": 901233,
                "p50_ms": 410,
                "p95_ms": 1830,
            },
            {
                "service": "embeddings",
                "requests": 20411,
                "errors": 0,
                "tokens": 312000,
                "p50_ms": 18,
                "p95_ms": 45,
            },
            {
                "service": "ocr",
                "requests": 310,
                "errors": 3,
                "tokens": 0,
                "p50_ms": 820,
                "p95_ms": 2400,
            },
            {
                "service": "rag",
                "requests": 870,
                "errors": 1,
                "tokens": 45000,
                "p50_ms": 260,
                "p95_ms": 900,
            },
        ],
        "by_worker": [
            {
                "worker": "a1b2c3d4e5f60718",
                "requests": 25531,
                "errors": 12,
                "tokens": 1213233,
                "p50_ms": 40,
                "p95_ms": 1700,
            },
        ],
    },
}

EVENTS = [
    EventPublic.model_validate(e)
    for e in [
        {
            "id": 1,
            "ts": _ago(3 * 86400),
            "kind": "joined",
            "worker_id": "a1b2c3d4e5f60718",
            "message": "worker gpu-box-01 joined as tier gpu with vllm, embeddings",
        },
        {
            "id": 2,
            "ts": _ago(86400),
            "kind": "joined",
            "worker_id": "d4e5f60718293a4b",
            "message": "worker homeserver joined as tier service with rag, llm",
        },
        {
            "id": 3,
            "ts": _ago(7300),
            "kind": "removed",
            "worker_id": "f60718293a4b5c6d",
            "message": "worker old-nuc was removed: no heartbeat for 600 s",
        },
        {
            "id": 4,
            "ts": _ago(3600),
            "kind": "joined",
            "worker_id": "c3d4e5f60718293a",
            "message": "worker laptop-ana joined as tier service with ocr, ner",
        },
        {
            "id": 5,
            "ts": _ago(1800),
            "kind": "token_revoked",
            "worker_id": None,
            "message": "join token 7f3a revoked",
        },
        {
            "id": 6,
            "ts": _ago(600),
            "kind": "service",
            "worker_id": "b2c3d4e5f6071829",
            "message": "ollama on gamer-pc is unhealthy",
        },
        {
            "id": 7,
            "ts": _ago(320),
            "kind": "drained",
            "worker_id": "d4e5f60718293a4b",
            "message": "worker homeserver is draining",
        },
        {
            "id": 8,
            "ts": _ago(200),
            "kind": "offline",
            "worker_id": "e5f60718293a4b5c",
            "message": "worker pi-cluster-3 is offline: no heartbeat for 120 s",
        },
        {
            "id": 9,
            "ts": _ago(60),
            "kind": "failover",
            "worker_id": "a1b2c3d4e5f60718",
            "message": "vllm request retried on gpu-box-01 after gamer-pc failed (503)",
        },
    ]
]

TOKENS = [
    TokenPublic.model_validate(t)
    for t in [
        {
            "id": "7f3a",
            "label": "bob's laptop",
            "created_at": _ago(7200),
            "expires_at": _ago(5400),
            "uses": 1,
            "used": 0,
            "revoked": True,
            "status": "revoked",
        },
        {
            "id": "9c1e",
            "label": "lab machines",
            "created_at": _ago(3600),
            "expires_at": _ago(-82800),
            "uses": 10,
            "used": 3,
            "revoked": False,
            "status": "active",
        },
        {
            "id": "b004",
            "label": "",
            "created_at": _ago(86400),
            "expires_at": _ago(84600),
            "uses": 1,
            "used": 1,
            "revoked": False,
            "status": "used",
        },
    ]
]


#: ``GET /api/admin/credits?by=owner``: bob's quarantined worker forfeited its escrow.
CREDITS = [
    CreditBalance.model_validate(c)
    for c in [
        {"id": "alice", "name": "alice", "owner": "alice", "credits": 1843.25, "escrow": 0.0,
         "requests": 21873},
        {"id": "ana", "name": "ana", "owner": "ana", "credits": 0.0, "escrow": 12.4,
         "requests": 310},
        {"id": "bob", "name": "bob", "owner": "bob", "credits": 0.0, "escrow": 0.0,
         "requests": 41},
        {"id": "", "name": "(no owner)", "owner": "", "credits": 96.5, "escrow": 0.0,
         "requests": 4507},
    ]
]  # fmt: skip


def make_history() -> History:
    """Five minutes of made-up but fixed load, as if the app had been polling every 5 s."""
    h = History()
    now = NOW.timestamp()
    for i in range(60):
        t = now - 300 + i * 5
        wave = math.sin(i / 6)
        h.add("service", "vllm", "rps", t, 6 + 3 * wave)
        h.add("service", "embeddings", "rps", t, 14 + 5 * math.cos(i / 4))
        h.add("service", "ocr", "rps", t, 1 + (i % 12) / 6)
        h.add("service", "rag", "rps", t, 2 + wave)
        h.add("service", "vllm", "p95", t, 1500 + 400 * wave)
        h.add("service", "embeddings", "p95", t, 45 + 10 * wave)
        h.add("service", "ocr", "p95", t, 2200 + 300 * math.cos(i / 5))
        h.add("service", "rag", "p95", t, 900 + 150 * wave)
        h.add("service", "vllm", "eps", t, 0.4 if 30 <= i < 36 else 0.0)
        h.add("service", "ocr", "eps", t, 0.2 if i % 17 == 0 else 0.0)
        h.add("pool", "all", "rps", t, 23 + 8 * wave)
        for k, w in enumerate(WORKERS[:4]):
            base = w.load.cpu_percent
            h.add("worker", w.id, "cpu", t, max(0, min(100, base + 15 * math.sin(i / 5 + k))))
            h.add("worker", w.id, "mem", t, w.load.memory_percent)
            if w.load.gpu_percent is not None:
                gpu = w.load.gpu_percent + 10 * math.cos(i / 7 + k)
                h.add("worker", w.id, "gpu", t, max(0, min(100, gpu)))
            h.add("worker", w.id, "inflight", t, float(round(2 + 2 * math.sin(i / 8 + k))))
    return h


class StubClient:
    """Answers like :class:`rma.client.CoordinatorClient`, from the fixed dataset above."""

    base_url = "http://coordinator.example:8420"

    def __init__(self) -> None:
        self.workers_list = list(WORKERS)
        self.calls: list[str] = []

    async def workers(self, status: str | None = None) -> list[WorkerPublic]:
        self.calls.append("workers")
        return [w for w in self.workers_list if status is None or w.status.value == status]

    async def worker(self, worker_id: str) -> WorkerPublic:
        return next(w for w in self.workers_list if w.id == worker_id)

    async def stats(self) -> dict[str, Any]:
        self.calls.append("stats")
        return STATS

    async def tokens(self) -> list[TokenPublic]:
        return list(TOKENS)

    async def services(self) -> list[dict[str, Any]]:
        self.calls.append("services")
        return SERVICES

    async def events(self, limit: int = 100) -> list[EventPublic]:
        self.calls.append("events")
        return EVENTS[-limit:]

    async def follow_events(self, since: int | None = None) -> AsyncIterator[EventPublic]:
        """The backlog, then nothing: a quiet but open stream."""
        for e in EVENTS:
            if since is None or e.id > since:
                yield e
        await asyncio.Event().wait()

    async def drain(self, worker_id: str) -> WorkerPublic:
        self.calls.append(f"drain {worker_id}")
        return (await self.worker(worker_id)).model_copy(update={"status": "draining"})

    async def undrain(self, worker_id: str) -> WorkerPublic:
        self.calls.append(f"undrain {worker_id}")
        return (await self.worker(worker_id)).model_copy(update={"status": "online"})

    async def remove(self, worker_id: str) -> WorkerPublic:
        self.calls.append(f"remove {worker_id}")
        return (await self.worker(worker_id)).model_copy(update={"status": "removed"})

    async def credits(self, by: str = "worker", since: str | None = None) -> list[CreditBalance]:
        self.calls.append(f"credits {by}")
        return list(CREDITS)

    async def quarantine(self, worker_id: str) -> WorkerPublic:
        self.calls.append(f"quarantine {worker_id}")
        return (await self.worker(worker_id)).model_copy(update={"quarantined": True})

    async def unquarantine(self, worker_id: str) -> WorkerPublic:
        self.calls.append(f"unquarantine {worker_id}")
        return (await self.worker(worker_id)).model_copy(update={"quarantined": False})

    async def revoke_token(self, token_id: str) -> TokenPublic:
        self.calls.append(f"revoke {token_id}")
        token = next(t for t in TOKENS if t.id == token_id)
        return token.model_copy(update={"revoked": True, "status": "revoked"})

    async def aclose(self) -> None:
        self.calls.append("aclose")


def make_app(refresh: float = 3600.0) -> Any:
    """The real app over the stub, time frozen at :data:`NOW`, polling once (refresh: an hour)."""
    from rma.tui.app import TopApp

    stub = StubClient()
    return TopApp(lambda: stub, refresh=refresh, clock=frozen_clock, history=make_history())  # type: ignore[arg-type, return-value]


async def settle_credits(pilot: Any) -> None:
    """Settle, then open the Credits tab and wait until the ledger is drawn."""
    await settle(pilot)
    await pilot.press("7")
    app = pilot.app
    for _ in range(200):
        if app.credits_loaded:
            break
        await pilot.pause(0.01)
    await pilot.pause()


async def settle(pilot: Any) -> None:
    """Wait until the first poll and the event backlog are drawn."""
    app = pilot.app
    await asyncio.wait_for(app.loaded.wait(), 10)
    for _ in range(100):
        if len(app.events) >= len(EVENTS) and app.connection == "live":
            break
        await pilot.pause(0.01)
    await pilot.pause()
