"""Short garbage-collector pauses for a serving coordinator.

CPython's full (generation 2) collection walks every tracked object.  A coordinator holds a
few hundred thousand of them from its start alone (FastAPI, pydantic, SQLAlchemy, the catalog),
so a full collection under load stopped the event loop for 50 to 100 ms: those stalls were the
gateway's p99 at 32 concurrent clients (docs/benchmarks.md, "Gateway tail at c=32").

After its start, a serving coordinator (``rma coordinator serve``, ``rma up``) collects once and
then *freezes* what survives (``gc.freeze``): those objects move to a permanent generation that
later collections skip, so a full collection walks only what was made since.  Objects are still
freed by reference counting; only cycles among the frozen objects (made before the start) are
never collected, which is what the start leaves alive anyway.
"""

from __future__ import annotations

import gc
from typing import Any

#: ``app.state`` attribute that asks for the freeze (set by ``server_config``; apps made in
#: tests, many per process, leave it unset).
FREEZE_FLAG = "freeze_gc_after_start"


def freeze_after_start(state: Any) -> int:
    """Collect, then freeze the survivors, when ``state`` asks for it; the objects frozen."""
    if not getattr(state, FREEZE_FLAG, False):
        return 0
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
