"""Cool-downs across coordinators: a broken worker is avoided by all, a re-attached one served.

- **Shared cool-downs.** When this coordinator's gateway cools a worker's service down (it
  failed or refused a connection), or lifts a cool-down because the worker served again, the
  others are told: on Redis pub/sub (the ``rma:events`` channel) when ``--redis-url`` is set,
  else as a ``cooled`` notice on the PostgreSQL change channel.  Fire and forget, off the
  request path: the request only queues the message (Redis: the publisher task sends queued
  messages a pipeline at a time; PostgreSQL: a thread sends the notice); a lost one costs one
  more failed try on another coordinator, no more.  A coordinator that hears of a cool-down
  applies it for the seconds given (at most ``cooldown_max``), and never tells it on.
- **A new tunnel lifts the old transport's marks.** A worker whose tunnel (re)attaches, here or
  to another coordinator, gets its cool-downs and its unreachable mark lifted on every
  coordinator: the holder lifts its own at once and sends an ``attached`` notice (the change
  channel) naming itself; the others point their tunnel map at it and lift theirs.  A worker
  that moved its tunnel off a killed coordinator serves again as soon as it is re-attached,
  instead of after the cool-down that each survivor gave it when relaying to the dead one failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from rma.coordinator.cluster.changes import Notice

if TYPE_CHECKING:
    from rma.coordinator.cluster.node import Node
    from rma.coordinator.cluster.relay import TunnelMap
    from rma.coordinator.gateway.balancer import Balancer
    from rma.coordinator.registry import WorkerState
    from rma.coordinator.shared import SharedEvents

log = logging.getLogger("rma.coordinator.cluster")

#: Change-channel notice kinds: a cool-down given or lifted; a tunnel attached to its sender.
COOLED = "cooled"
ATTACHED = "attached"
#: The Redis message type of a cool-down.
REDIS_TYPE = "cooled"
#: Longest worker id or service name taken from a message.
MAX_NAME = 200


def _valid(worker_id: Any, service: Any, seconds: Any) -> bool:
    return (
        isinstance(worker_id, str)
        and isinstance(service, str)
        and 0 < len(worker_id) <= MAX_NAME
        and 0 < len(service) <= MAX_NAME
        and isinstance(seconds, int | float)
        and not isinstance(seconds, bool)
        and seconds >= 0
    )


class CoolShare:
    """Wires one coordinator's balancer to the others (see the module's docstring)."""

    def __init__(
        self,
        balancer: Balancer,
        node: Node | None,
        redis: SharedEvents | None,
        tunnels: TunnelMap | None = None,
        own_url: str = "",
    ) -> None:
        self.balancer = balancer
        self.node = node
        self.redis = redis
        self.tunnels = tunnels
        self.own_url = own_url
        #: Messages heard from the others (cool-downs, lifts, attachments), for tests and stats.
        self.heard = 0
        self.loop: asyncio.AbstractEventLoop | None = None
        self._sending: set[asyncio.Future[Any]] = set()

    async def start(self) -> None:
        """Remember the event loop (an app background task; it ends at once)."""
        self.loop = asyncio.get_running_loop()

    def install(self) -> None:
        self.balancer.on_cool.append(self.cooled)
        if self.redis is not None:
            self.redis.handlers[REDIS_TYPE] = self._from_redis
        if self.node is not None:
            if self.redis is None:
                self.node.handlers[COOLED] = self._from_node
            self.node.handlers[ATTACHED] = self._attached_elsewhere
        if self.tunnels is not None:
            self.tunnels.on_move.append(self._moved)

    # --- out --------------------------------------------------------------------------------------

    def cooled(self, worker_id: str, service: str, seconds: float) -> None:
        """The balancer gave (or lifted, ``seconds`` 0) a cool-down: tell the others."""
        if self.redis is not None:
            self.redis.send({"type": REDIS_TYPE, "w": worker_id, "s": service, "t": seconds})
        elif self.node is not None:
            self._notify(COOLED, worker_id, {"s": service, "t": seconds})

    def attached(self, worker: WorkerState) -> None:
        """A tunnel of ``worker`` attached to this coordinator (the hub's hook, on the loop)."""
        self.balancer.forget(worker.id)
        if self.node is not None:
            self._notify(ATTACHED, worker.id, {"at": self.own_url})

    def _notify(self, kind: str, ident: str, data: dict[str, Any]) -> None:
        node, loop = self.node, self.loop
        if node is None or loop is None or loop.is_closed() or not node.connected:
            return
        try:
            fut = loop.run_in_executor(None, node.publish, kind, ident, data)
        except RuntimeError:  # the executor is shutting down
            return
        self._sending.add(fut)
        fut.add_done_callback(self._sent)

    def _sent(self, fut: asyncio.Future[Any]) -> None:
        self._sending.discard(fut)
        if not fut.cancelled() and fut.exception() is not None:
            log.debug("could not send a cool-down notice: %s", fut.exception())

    # --- in ---------------------------------------------------------------------------------------

    def _from_redis(self, message: dict[str, Any]) -> None:
        """A Redis message (on the loop)."""
        worker_id, service, seconds = message.get("w"), message.get("s"), message.get("t")
        if _valid(worker_id, service, seconds):
            self.heard += 1
            self.balancer.cool(str(worker_id), str(service), float(str(seconds)))

    def _from_node(self, notice: Notice) -> None:
        """A ``cooled`` notice (on the cluster thread): applied on the loop."""
        service, seconds = notice.data.get("s"), notice.data.get("t")
        if _valid(notice.ident, service, seconds):
            self._on_loop(self.balancer.cool, notice.ident, str(service), float(str(seconds)))

    def _attached_elsewhere(self, notice: Notice) -> None:
        """An ``attached`` notice (on the cluster thread): the worker's tunnel is there now."""
        url = notice.data.get("at")
        if not notice.ident or len(notice.ident) > MAX_NAME:
            return
        if self.tunnels is not None and isinstance(url, str) and url:
            self.tunnels.put(url, [notice.ident])  # may call _moved: lifting twice is harmless
        self._on_loop(self.balancer.forget, notice.ident)

    def _moved(self, ids: list[str]) -> None:
        """The tunnel map learned a new holder for these workers (cluster thread)."""
        for ident in ids:
            self._on_loop(self.balancer.forget, ident)

    def _on_loop(self, fn: Callable[..., Any], *args: Any) -> None:
        loop = self.loop
        if loop is None or loop.is_closed():
            return
        self.heard += 1
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            loop.call_soon_threadsafe(fn, *args)
