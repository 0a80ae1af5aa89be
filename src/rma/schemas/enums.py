"""Enums with their state machines documented."""

from __future__ import annotations

from enum import IntEnum, StrEnum


class Tier(IntEnum):
    """What a worker can host. Lower is more capable; it also hosts higher tiers' services."""

    GPU = 1
    SERVICE = 2
    DATA = 3

    @property
    def label(self) -> str:
        return {1: "gpu", 2: "service", 3: "data"}[self.value]


class WorkerStatus(StrEnum):
    """A worker's life as the coordinator sees it.

    ::

        register ──> online ──(silent offline_after)──> offline ──(silent remove_after)──> removed
                      │  ^                                 │
                      │  └────────(heartbeat)──────────────┘
                      ├──(admin drain / agent draining)──> draining ──(undrain)──> online
                      └──(POST /api/worker/leave)──> left
        admin remove (any state) ──> removed;  register again with worker_id ──> online

    Only ``online`` workers get new requests.  A ``removed`` worker's credential is rejected.
    """

    ONLINE = "online"
    OFFLINE = "offline"
    DRAINING = "draining"
    LEFT = "left"
    REMOVED = "removed"


class ServiceState(StrEnum):
    """One assigned service on one worker, as its agent reports it.

    ::

        pending -> pulling -> starting -> running <-> unhealthy
                      │           │          │
                      └──> failed <──────────┴──> crashed -> (backoff) -> starting
        any -> stopping -> stopped   (unassigned, or the agent leaves)
        (assigned) -> refused        (the donor's policy: never started)

    ``failed`` is terminal until the assignment changes (bad image, missing extra, no engine);
    ``crashed`` is retried with backoff.  ``refused``: the donor's agent will not run this
    assignment (not in its catalog, a definition that differs from its own, over its limits, not
    in its ``--services``); nothing was started, and it stays so until the assignment changes.
    """

    PENDING = "pending"
    PULLING = "pulling"
    STARTING = "starting"
    RUNNING = "running"
    UNHEALTHY = "unhealthy"
    CRASHED = "crashed"
    FAILED = "failed"
    STOPPING = "stopping"
    STOPPED = "stopped"
    REFUSED = "refused"


class Transport(StrEnum):
    """How the coordinator reaches a worker's services."""

    TUNNEL = "tunnel"
    DIRECT = "direct"
