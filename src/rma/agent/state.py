"""What the agent keeps in its data dir.

- ``worker.json`` (0600): the worker's identity and re-join secret, so a restarted agent joins
  again as the same worker without a new token.
- ``worker-status.json`` (0600): what the agent runs and its last heartbeat, for
  ``rma worker status``.
- ``served.json`` (0600): requests served, today and in total (kept across restarts).
- ``agent.lock``: held (``flock``) while an agent runs on this data dir; the kernel releases it
  when the agent dies, even by SIGKILL.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

IDENTITY_FILE = "worker.json"
STATUS_FILE = "worker-status.json"
LOCK_FILE = "agent.lock"
SERVED_FILE = "served.json"


class StateError(Exception):
    """The data dir cannot be used (unreadable identity, another agent holds it, ...)."""


class Identity(BaseModel):
    worker_id: str
    worker_secret: str
    coordinator_url: str
    name: str = ""


def ensure_dir(data_dir: Path) -> Path:
    """Create the data dir (0700 when new)."""
    try:
        data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise StateError(f"cannot create the data dir {data_dir}: {exc.strerror}") from None
    return data_dir


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically, readable by the owner only (0600)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def load_identity(data_dir: Path) -> Identity | None:
    """The saved identity, or ``None`` when there is none; a damaged file is an error."""
    path = data_dir / IDENTITY_FILE
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StateError(f"cannot read {path}: {exc.strerror}") from None
    try:
        return Identity.model_validate_json(text)
    except ValidationError:
        raise StateError(
            f"{path} is damaged; delete it to join as a new worker (with a new token)"
        ) from None


def save_identity(data_dir: Path, identity: Identity) -> Path:
    ensure_dir(data_dir)
    path = data_dir / IDENTITY_FILE
    write_private(path, identity.model_dump_json(indent=2) + "\n")
    return path


def forget_identity(data_dir: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        (data_dir / IDENTITY_FILE).unlink()


def save_status(data_dir: Path, status: dict[str, Any]) -> None:
    write_private(data_dir / STATUS_FILE, json.dumps(status, indent=2, default=str) + "\n")


def load_status(data_dir: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((data_dir / STATUS_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def agent_key(data_dir: Path) -> str:
    """A short stable id for "the agent of this data dir on this host" (labels its containers)."""
    raw = f"{socket.gethostname()}:{data_dir.expanduser().resolve()}"
    return hashlib.sha256(raw.encode()).hexdigest()[:12]


class AgentLock:
    """An exclusive ``flock`` on ``<data-dir>/agent.lock``: one agent per data dir."""

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        import fcntl

        ensure_dir(self.path.parent)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise StateError(
                f"another agent is running with the data dir {self.path.parent} "
                "(stop it first, or pass a different --data-dir)"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def agent_running(data_dir: Path) -> int | None:
    """The pid of the agent holding this data dir, or ``None`` when none runs."""
    import fcntl

    path = data_dir / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            text = os.read(fd, 32).decode(errors="replace").strip()
            return int(text) if text.isdigit() else -1
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


class Served(BaseModel):
    """Requests this machine served for the pool (counted by the agent's tunnel)."""

    total: int = 0
    today: int = 0
    day: str = ""

    def add(self, n: int, day: str) -> None:
        if day != self.day:
            self.day, self.today = day, 0
        self.today += n
        self.total += n


def load_served(data_dir: Path) -> Served:
    try:
        return Served.model_validate_json((data_dir / SERVED_FILE).read_text())
    except (OSError, ValidationError):
        return Served()


def save_served(data_dir: Path, served: Served) -> None:
    write_private(data_dir / SERVED_FILE, served.model_dump_json() + "\n")
