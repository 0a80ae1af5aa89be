"""This coordinator among the others: the leader election and the change listener, one thread.

:class:`Node` (PostgreSQL) keeps one dedicated connection, outside the engine's pool, on a
thread of its own:

- it ``LISTEN``\\ s on :data:`~.changes.CHANNEL` and applies the other coordinators' notices to
  the routing table as they come (well within a second);
- every ``leader_retry_interval`` seconds a follower tries ``pg_try_advisory_lock`` (session
  level): the coordinator that holds it is the leader, until its connection ends; PostgreSQL
  then releases the lock and the next follower to try takes it.  The leader checks its
  connection at the same pace and stops leading the moment it fails;
- after every (re)connection it reloads every worker (notices sent while it was away are lost),
  and it does so again on becoming the leader, before the sweeper judges anyone.

A killed coordinator's connection closes with its process, so failover takes at most one retry
interval; a host that vanishes is noticed through TCP keepalives (about 11 s, set on the
connection for both ends).

:class:`Solo` (SQLite: one coordinator) is always the leader and announces nothing.
"""

from __future__ import annotations

import logging
import secrets
import socket
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sqlmodel import Session

from rma.coordinator.cluster import changes

if TYPE_CHECKING:
    import psycopg

    from rma.coordinator.pool import Pool

log = logging.getLogger("rma.coordinator.cluster")

#: The advisory lock the coordinators of a pool compete for ("rma" in ASCII).
LOCK_KEY = 0x726D61
#: This coordinator's ``application_name`` on its cluster connection: how the others find the
#: leader's name (``pg_locks`` joined with ``pg_stat_activity``).
APP_PREFIX = "rma "
#: Seconds ``notifies`` waits before the loop looks at its clock again (and at ``stop``).
POLL = 0.25

_WHO_LEADS = """
SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'advisory' AND l.granted AND l.classid = 0 AND l.objid = %s
  AND l.objsubid = 1
  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
LIMIT 1
"""
#: Live coordinators: one cluster connection each (its ``application_name`` starts "rma ").
_HOW_MANY = """
SELECT count(*) FROM pg_stat_activity
WHERE datname = current_database() AND application_name LIKE 'rma %'
"""


def default_name(port: int) -> str:
    return f"{socket.gethostname()}:{port}"


class Solo:
    """The only coordinator (SQLite): always the leader, nothing to announce or to hear."""

    #: Whether other coordinators may share the database (notices are sent, leadership elected).
    shared = False

    def __init__(self, name: str) -> None:
        self.name = name
        self.origin = ""

    @property
    def is_leader(self) -> bool:
        return True

    @property
    def leader(self) -> str | None:
        return self.name

    @property
    def coordinators(self) -> int:
        """Live coordinators of the pool, this one included."""
        return 1

    def announce(self, s: Session, kind: str, ident: str = "") -> None:
        """Tell the other coordinators, when ``s`` commits, that a record changed."""

    def start(self, wait: float = 5.0) -> None:
        """Start following the other coordinators (nothing to follow here)."""

    def stop(self) -> None:
        """Stop following; gives up the leadership."""

    def describe(self) -> dict[str, str | None]:
        """``/readyz``'s part: this coordinator, the leader, and this one's role."""
        leader = self.leader
        role = "leader" if self.is_leader else "follower"
        return {"coordinator": self.name, "leader": leader, "role": role}


#: What the app holds: either kind.
Cluster = Solo


class Node(Solo):
    """One of several coordinators on a PostgreSQL database."""

    shared = True

    def __init__(self, pool: Pool, name: str, retry_interval: float) -> None:
        super().__init__(name)
        self.pool = pool
        self.retry_interval = retry_interval
        #: Tells this coordinator's own notices from the others' (names may repeat).
        self.origin = secrets.token_hex(6)
        self.leader_since: float | None = None
        #: True while the cluster connection is up (notices are heard).
        self.connected = False
        #: Notices applied, and full reloads done (for tests and metrics).
        self.applied = 0
        self.resyncs = 0
        #: Other notice kinds -> who applies them (the relay's ``tunnels``); on this thread.
        self.handlers: dict[str, Callable[[changes.Notice], None]] = {}
        #: Told (on this thread) when the count of live coordinators changes (the gateway's
        #: share of each worker's capacity, with ``split_capacity``).
        self.on_coordinators: list[Callable[[int], None]] = []
        self._coordinators = 1
        self._leading = False
        self._leader_name: str | None = None
        self._stop = threading.Event()
        self._tried = threading.Event()  # the first election attempt is over
        self._thread: threading.Thread | None = None
        self._conn: psycopg.Connection[Any] | None = None

    @property
    def is_leader(self) -> bool:
        return self._leading

    @property
    def leader(self) -> str | None:
        return self.name if self._leading else self._leader_name

    @property
    def coordinators(self) -> int:
        return self._coordinators

    def announce(self, s: Session, kind: str, ident: str = "") -> None:
        changes.send(s, self.origin, kind, ident)

    def publish(self, kind: str, ident: str = "", data: dict[str, Any] | None = None) -> None:
        """Send a notice outside any write (blocking: call it from a thread)."""
        from sqlalchemy import text

        with self.pool.engine.begin() as conn:
            conn.execute(
                text("SELECT pg_notify(:channel, :payload)"),
                {
                    "channel": changes.CHANNEL,
                    "payload": changes.encode(self.origin, kind, ident, data),
                },
            )

    def start(self, wait: float = 5.0) -> None:
        """Start the thread; wait (at most ``wait`` s) for its first try at the leadership, so a
        coordinator knows its role before it serves (blocking: call it from a thread)."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._tried.clear()
        self._thread = threading.Thread(target=self._run, name="rma-cluster", daemon=True)
        self._thread.start()
        self._tried.wait(wait)

    def stop(self) -> None:
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout=10)

    # --- the thread -------------------------------------------------------------------------------

    def _dsn(self) -> str:
        url = self.pool.engine.url.set(drivername="postgresql")
        return url.render_as_string(hide_password=False)

    def _connect(self) -> psycopg.Connection[Any]:
        import psycopg

        conn = psycopg.connect(
            self._dsn(),
            autocommit=True,
            application_name=(APP_PREFIX + self.name)[:63],
            connect_timeout=10,
            keepalives=1,
            keepalives_idle=5,
            keepalives_interval=2,
            keepalives_count=3,
        )
        try:  # the server's side too: a leader whose host vanished lets go of the lock
            conn.execute("SET tcp_keepalives_idle = 5")
            conn.execute("SET tcp_keepalives_interval = 2")
            conn.execute("SET tcp_keepalives_count = 3")
        except psycopg.Error:
            log.debug("cannot set the server's TCP keepalives", exc_info=True)
        return conn

    def _run(self) -> None:
        backoff = 0.5
        while not self._stop.is_set():
            try:
                conn = self._conn = self._connect()
                try:
                    conn.execute(f"LISTEN {changes.CHANNEL}")
                    self._resync()  # notices sent while this one was not listening are lost
                    self.connected = True
                    backoff = 0.5
                    self._follow(conn)
                finally:
                    self._lose("the cluster connection closed")
                    self.connected = False
                    self._conn = None
                    conn.close()
            except Exception as exc:
                self._tried.set()  # no database yet: a follower until it answers
                if not self._stop.is_set():
                    log.warning(
                        "cluster connection to the database failed: %s; retrying in %.1f s",
                        exc,
                        backoff,
                    )
            self._stop.wait(backoff)
            backoff = min(backoff * 2, max(self.retry_interval, 0.5))

    def _follow(self, conn: psycopg.Connection[Any]) -> None:
        next_elect = 0.0
        while not self._stop.is_set():
            if time.monotonic() >= next_elect:
                self._elect(conn)
                self._tried.set()
                next_elect = time.monotonic() + self.retry_interval
            # never left early: notices that came in one packet with the one being applied
            # would be dropped with the generator; it ends by itself after POLL seconds
            for note in conn.notifies(timeout=POLL):
                notice = changes.decode(note.payload)
                if notice is not None and notice.origin != self.origin:
                    self._apply(notice)

    def _apply(self, notice: changes.Notice) -> None:
        try:
            if notice.kind == changes.WORKER and notice.ident:
                changes.reload_worker(self.pool, notice.ident)
            elif notice.kind == changes.KEYS and notice.ident:
                self.pool.credentials.refresh_key(notice.ident)  # one key: not all N of them
            elif notice.kind == changes.KEYS:
                self.pool.credentials.refresh()
            elif notice.kind == changes.EVENT and notice.ident.isdigit():
                self.pool.events.relay(int(notice.ident))
            elif notice.kind in self.handlers:
                self.handlers[notice.kind](notice)
            self.applied += 1
        except Exception:  # a failed read is repaired by the next resync, never fatal here
            log.exception("could not apply a change notice (%s %s)", notice.kind, notice.ident)

    def _resync(self) -> None:
        changes.resync(self.pool)
        self.pool.credentials.refresh()
        self.resyncs += 1

    def _elect(self, conn: psycopg.Connection[Any]) -> None:
        if self._leading:
            conn.execute("SELECT 1")  # the connection holds the lock as long as it lives
        else:
            row = conn.execute("SELECT pg_try_advisory_lock(%s)", (LOCK_KEY,)).fetchone()
            if row is not None and row[0]:
                self._win()
        row = conn.execute(_WHO_LEADS, (LOCK_KEY,)).fetchone()
        name = str(row[0]) if row is not None and row[0] else None
        self._leader_name = name[len(APP_PREFIX) :] if name else None
        row = conn.execute(_HOW_MANY).fetchone()
        count = max(1, int(row[0])) if row is not None and row[0] is not None else 1
        if count != self._coordinators:
            self._coordinators = count
            for hook in self.on_coordinators:
                try:
                    hook(count)
                except Exception:
                    log.exception("a hook on the count of coordinators failed")

    def _win(self) -> None:
        # the heartbeats the others heard, before this one judges anyone
        self._resync()
        self.leader_since = self.pool.clock.time()
        self._leading = True
        log.warning("this coordinator (%s) is the leader now", self.name)
        try:
            self.pool.events.emit(
                "leader_elected",
                f"coordinator {self.name} is the leader: it sweeps and schedules",
                data={"coordinator": self.name},
            )
        except Exception:
            log.exception("could not record the leader_elected event")

    def _lose(self, why: str) -> None:
        if self._leading:
            self._leading = False
            self.leader_since = None
            log.warning("this coordinator (%s) is no longer the leader: %s", self.name, why)


def make_cluster(pool: Pool) -> Solo:
    """A :class:`Node` on PostgreSQL, else :class:`Solo`."""
    cfg = pool.settings
    name = cfg.coordinator_name or cfg.public_url or default_name(cfg.port)
    if pool.engine.dialect.name == "postgresql":
        return Node(pool, name, cfg.leader_retry_interval)
    return Solo(name)
