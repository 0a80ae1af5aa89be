"""The coordinator's backup store: data services' backups, uploaded by their holders.

``<data-dir>/backups/<service>/<created-ms>-<worker-id>.bak`` with a JSON sidecar (``.json``:
service, worker, time, size, SHA-256).  A file is written under a temporary name and renamed
once complete, so a broken upload leaves nothing; the newest ``keep`` per service stay.  A new
holder downloads the newest before its copy of the service is reported healthy.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import threading
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

from rma.coordinator.errors import APIError
from rma.schemas.api import BackupPublic

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


class BackupStore:
    def __init__(self, root: Path, *, keep: int, max_bytes: int) -> None:
        self.root = root
        self.keep = keep
        self.max_bytes = max_bytes
        self._lock = threading.Lock()

    def _dir(self, service: str) -> Path:
        if not _NAME.match(service):
            raise APIError(400, f"bad service name {service!r}", "bad_request")
        return self.root / service

    async def save(
        self, service: str, worker_id: str, worker: str, body: AsyncIterator[bytes]
    ) -> BackupPublic:
        """Store an upload; 413 past ``max_bytes``, 400 when empty (nothing is kept then)."""
        folder = self._dir(service)
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        created = time.time()
        stem = f"{int(created * 1000)}-{worker_id}"
        tmp = folder / f".{stem}.part"
        digest = hashlib.sha256()
        size = 0
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as fh:
                async for chunk in body:
                    size += len(chunk)
                    if size > self.max_bytes:
                        raise APIError(
                            413,
                            f"backup larger than {self.max_bytes} bytes (max_backup_bytes)",
                            "too_large",
                        )
                    digest.update(chunk)
                    fh.write(chunk)
                fh.flush()
                os.fsync(fh.fileno())
            if size == 0:
                raise APIError(400, "an empty backup", "empty_backup")
            info = BackupPublic(
                id=stem,
                service=service,
                worker_id=worker_id,
                worker=worker,
                created_at=datetime.fromtimestamp(created, UTC),
                size=size,
                sha256=digest.hexdigest(),
            )
            meta = folder / f"{stem}.json"
            meta.write_text(info.model_dump_json())
            os.replace(tmp, folder / f"{stem}.bak")
        finally:
            tmp.unlink(missing_ok=True)
        self._prune(folder)
        return info

    def _entries(self, folder: Path) -> list[tuple[Path, BackupPublic]]:
        out = []
        for meta in folder.glob("*.json"):
            data = meta.with_suffix(".bak")
            if not data.exists():
                continue
            with contextlib.suppress(OSError, ValueError):
                out.append((data, BackupPublic.model_validate_json(meta.read_text())))
        out.sort(key=lambda e: e[1].created_at, reverse=True)
        return out

    def _prune(self, folder: Path) -> None:
        with self._lock:
            for data, _ in self._entries(folder)[self.keep :]:
                data.with_suffix(".json").unlink(missing_ok=True)
                data.unlink(missing_ok=True)

    def list(self) -> list[BackupPublic]:
        """Every backup kept, by service, newest first."""
        if not self.root.is_dir():
            return []
        return [
            info
            for folder in sorted(p for p in self.root.iterdir() if p.is_dir())
            for _, info in self._entries(folder)
        ]

    def latest(self, service: str) -> tuple[Path, BackupPublic] | None:
        folder = self._dir(service)
        entries = self._entries(folder) if folder.is_dir() else []
        return entries[0] if entries else None

    def get(self, service: str, backup_id: str | None) -> tuple[Path, BackupPublic] | None:
        """The backup ``backup_id`` of ``service`` (``None``: the newest), if it is kept."""
        if backup_id is None:
            return self.latest(service)
        folder = self._dir(service)
        entries = self._entries(folder) if folder.is_dir() else []
        return next((e for e in entries if e[1].id == backup_id), None)

    def summary(self) -> dict[str, dict[str, object]]:
        """The newest backup of each service: time and size (``rma admin services``, stats)."""
        out: dict[str, dict[str, object]] = {}
        for info in self.list():
            if info.service not in out:
                out[info.service] = {"at": info.created_at.isoformat(), "size": info.size}
        return out
