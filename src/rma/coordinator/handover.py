"""A fresh backup before an operator's drain hands a data service over.

``rma admin drain`` of a worker that holds a data service with a catalog ``backup`` asks that
holder for one more backup now (the ``backup`` list of its next heartbeat answers) and holds
the service's new placement back until the backup is in the store: the next holder restores
that one, not the last periodic backup, so a planned move loses only what is written during
the hand-over itself.  The wait is bounded (``handover_backup_timeout``) and ends early when
the holder stops draining or is no longer online (offline, left, removed): then the service is
placed from the newest backup there is, as after a failure.

Pending requests live in memory: a restarted coordinator forgets them (and places the services
at once, from the newest backup).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Pending:
    service: str
    worker_id: str
    worker: str
    #: when the request was made and when the wait gives up (the pool's clock)
    since: float
    deadline: float


class HandOvers:
    """Data services waiting for their draining holder's fresh backup."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._pending: dict[str, Pending] = {}
        self._lock = threading.Lock()

    def request(self, service: str, worker_id: str, worker: str, now: float) -> Pending | None:
        """Ask ``worker_id`` for a fresh backup of ``service``; ``None`` when the wait is off
        (``timeout`` 0)."""
        if self.timeout <= 0:
            return None
        p = Pending(service, worker_id, worker, now, now + self.timeout)
        with self._lock:
            self._pending[service] = p
        return p

    def arrived(self, service: str, worker_id: str) -> Pending | None:
        """A backup of ``service`` from ``worker_id`` is in the store: the wait is over (the
        request it answered, or ``None`` when none was pending)."""
        with self._lock:
            p = self._pending.get(service)
            if p is None or p.worker_id != worker_id:
                return None
            del self._pending[service]
            return p

    def asked_of(self, worker_id: str) -> list[str]:
        """The services ``worker_id`` should back up now (its heartbeat answer's ``backup``)."""
        if not self._pending:  # the heartbeat path: nothing to lock for, nearly always
            return []
        with self._lock:
            return sorted(s for s, p in self._pending.items() if p.worker_id == worker_id)

    def forget_worker(self, worker_id: str) -> list[Pending]:
        """The worker is no longer draining (undrained) or gone: stop waiting for it."""
        with self._lock:
            gone = [p for p in self._pending.values() if p.worker_id == worker_id]
            for p in gone:
                del self._pending[p.service]
        return gone

    def waiting(self, now: float, draining: Callable[[str], bool]) -> frozenset[str]:
        """The services whose placement elsewhere waits now; a wait past its deadline, or for
        a worker that ``draining`` says is not draining and online any more, ends here."""
        with self._lock:
            for p in list(self._pending.values()):
                if now >= p.deadline or not draining(p.worker_id):
                    del self._pending[p.service]
            return frozenset(self._pending)
