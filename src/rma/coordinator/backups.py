"""The coordinator's backup store: data services' backups, uploaded by their holders.

The index (service, id, worker, time, size, SHA-256 and where the bytes are) is the ``backup``
table, so every coordinator on one database lists the same backups; the bytes go to the
configured :class:`~rma.coordinator.backup_blobs.Blobs`: an S3-compatible bucket
(``backup_s3_url``), else ``<data-dir>/backups/<service>/<created-ms>-<worker-id>.bak``.
A backup is listed only once its bytes are completely stored, so a broken upload (or an
unreachable bucket) leaves the earlier ones as they were; the newest ``keep`` per service stay.
A new holder downloads the newest before its copy of the service is reported healthy; what it
gets is checked against the SHA-256 taken at upload as it is streamed (a mismatch breaks the
download off before its last bytes).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

import anyio
from sqlalchemy import Engine, delete
from sqlmodel import col, select

from rma.coordinator.backup_blobs import BlobMissing, Blobs, BlobStoreError, LocalBlobs, S3Blobs
from rma.coordinator.db import session
from rma.coordinator.errors import APIError
from rma.coordinator.tables import Backup
from rma.schemas.api import BackupPublic
from rma.settings import CoordinatorSettings

log = logging.getLogger(__name__)

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
T = TypeVar("T")


class BackupCorrupt(Exception):
    """The bytes read back do not match the backup's size or SHA-256."""


def _public(row: Backup) -> BackupPublic:
    return BackupPublic(
        id=row.id,
        service=row.service,
        worker_id=row.worker_id,
        worker=row.worker,
        created_at=datetime.fromtimestamp(row.created_at, UTC),
        size=row.size,
        sha256=row.sha256,
        location=row.location,
    )


def make_store(settings: CoordinatorSettings, engine: Engine, coordinator: str) -> BackupStore:
    """The store ``settings`` ask for: S3 when ``backup_s3_url`` is set, else the data dir."""
    local = LocalBlobs(settings.data_dir / "backups", coordinator)
    blobs: Blobs = local
    if settings.backup_s3_url:
        from rma.coordinator.s3.client import S3Client, S3Config

        assert settings.backup_s3_bucket  # (all validated by the settings)
        assert settings.backup_s3_access_key
        assert settings.backup_s3_secret_key is not None
        client = S3Client(
            S3Config(
                url=settings.backup_s3_url,
                bucket=settings.backup_s3_bucket,
                access_key=settings.backup_s3_access_key,
                secret_key=settings.backup_s3_secret_key.get_secret_value(),
                region=settings.backup_s3_region,
                addressing=settings.backup_s3_addressing,
                timeout=settings.backup_s3_timeout,
                ca_file=settings.backup_s3_ca_file,
            )
        )
        blobs = S3Blobs(client, settings.backup_s3_prefix, settings.backup_s3_part_size)
    return BackupStore(
        engine, blobs, local, keep=settings.backup_keep, max_bytes=settings.max_backup_bytes
    )


class BackupStore:
    def __init__(
        self, engine: Engine, blobs: Blobs, local: LocalBlobs, *, keep: int, max_bytes: int
    ) -> None:
        self.engine = engine
        self.blobs = blobs  # where new backups go
        self.local = local  # this coordinator's data dir (backups taken before S3, if any)
        self.keep = keep
        self.max_bytes = max_bytes

    @staticmethod
    def _check(service: str) -> None:
        if not _NAME.match(service):
            raise APIError(400, f"bad service name {service!r}", "bad_request")

    @staticmethod
    async def _db(fn: Callable[..., T], *args: Any) -> T:
        return await anyio.to_thread.run_sync(fn, *args)

    # -- start and stop -------------------------------------------------------------------

    async def start(self) -> None:
        """At start: list the data dir's backups of before the index (JSON sidecars) and say
        in the log whether the S3 bucket can be reached."""
        try:
            count = await self._db(self._import_sidecars)
        except Exception as exc:  # (the database; this start goes on without them)
            log.warning("backup store: the data dir's older backups are not listed: %s", exc)
        else:
            if count:
                log.info("backup store: %d backups of the data dir listed", count)
        if self.blobs is self.local:
            return
        try:
            await self.blobs.check()
        except BlobStoreError as exc:
            log.error("backup store: %s (uploads and restores fail until it is fixed)", exc)
        else:
            log.info("backup store: %s", self.blobs.describe())

    async def aclose(self) -> None:
        await self.blobs.aclose()

    async def readiness(self) -> dict[str, str]:
        """``/readyz``: how the last request to the S3 bucket went (no request of its own)."""
        state = getattr(self.blobs, "state", None)
        return {} if state is None else {"backup_store": str(state)}

    def _import_sidecars(self) -> int:
        root = self.local.root
        if not root.is_dir():
            return 0
        found: list[Backup] = []
        for meta in root.glob("*/*.json"):
            data = meta.with_suffix(".bak")
            if not data.exists():
                continue
            with contextlib.suppress(OSError, ValueError):
                info = BackupPublic.model_validate_json(meta.read_text())
                found.append(self._row(info, f"{meta.parent.name}/{data.name}", self.local))
        added = 0
        with session(self.engine) as s:
            for row in found:
                if s.get(Backup, (row.service, row.id)) is None:
                    s.add(row)
                    added += 1
        return added

    # -- upload ---------------------------------------------------------------------------

    @staticmethod
    def _row(info: BackupPublic, key: str, blobs: Blobs) -> Backup:
        return Backup(
            service=info.service,
            id=info.id,
            worker_id=info.worker_id,
            worker=info.worker,
            created_at=info.created_at.timestamp(),
            size=info.size,
            sha256=info.sha256,
            location=blobs.location,
            key=key,
        )

    async def save(
        self, service: str, worker_id: str, worker: str, body: AsyncIterator[bytes]
    ) -> BackupPublic:
        """Store an upload; 413 past ``max_bytes``, 400 when empty, 503 when the store fails
        (nothing is kept then, and the earlier backups stay)."""
        self._check(service)
        created = time.time()
        stem = f"{int(created * 1000)}-{worker_id}"
        key = f"{service}/{stem}.bak"
        digest = hashlib.sha256()
        size = 0

        async def counted() -> AsyncIterator[bytes]:
            nonlocal size
            async for chunk in body:
                size += len(chunk)
                if size > self.max_bytes:
                    raise APIError(
                        413,
                        f"backup larger than {self.max_bytes} bytes (max_backup_bytes)",
                        "too_large",
                    )
                digest.update(chunk)
                yield chunk
            if size == 0:
                raise APIError(400, "an empty backup", "empty_backup")

        blobs = self.blobs
        await blobs.put(key, counted())
        info = BackupPublic(
            id=stem,
            service=service,
            worker_id=worker_id,
            worker=worker,
            created_at=datetime.fromtimestamp(created, UTC),
            size=size,
            sha256=digest.hexdigest(),
            location=blobs.location,
        )
        try:
            await self._db(self._insert, self._row(info, key, blobs))
        except BaseException:
            with contextlib.suppress(Exception):
                await blobs.delete(key)
            raise
        await self._prune(service)
        return info

    def _insert(self, row: Backup) -> None:
        with session(self.engine) as s:
            s.add(row)

    def _rows(self, service: str | None = None, backup_id: str | None = None) -> list[Backup]:
        with session(self.engine) as s:
            q = select(Backup)
            if service is not None:
                q = q.where(Backup.service == service)
            if backup_id is not None:
                q = q.where(Backup.id == backup_id)
            q = q.order_by(col(Backup.service), col(Backup.created_at).desc())
            return list(s.exec(q).all())

    async def _prune(self, service: str) -> None:
        """The newest ``keep`` stay; an older one goes from the index once its bytes are
        deleted (or cannot be: they are on another coordinator's disk)."""
        for row in (await self._db(self._rows, service))[self.keep :]:
            try:
                await self._blobs_for(row).delete(row.key)
            except BlobStoreError as exc:
                if row.location.startswith("s3:") and row.location == self.blobs.location:
                    log.warning("backup %s of %s kept for now: %s", row.id, service, exc)
                    continue
            await self._db(self._forget, row.service, row.id)

    def _forget(self, service: str, backup_id: str) -> None:
        with session(self.engine) as s:
            s.exec(
                delete(Backup).where(col(Backup.service) == service, col(Backup.id) == backup_id)
            )

    # -- download -------------------------------------------------------------------------

    def _blobs_for(self, row: Backup) -> Blobs:
        """The store holding ``row``'s bytes; :class:`BlobStoreError` when this coordinator
        cannot reach them."""
        if row.location == self.blobs.location:
            return self.blobs
        if row.location.startswith("local:"):
            if row.location == self.local.location or self.local.path(row.key).exists():
                return self.local
            raise BlobStoreError(
                f"backup {row.id} of {row.service} is in the data dir of coordinator "
                f"{row.location.removeprefix('local:')!r}, not this one's "
                f"({self.local.location.removeprefix('local:')!r}): several coordinators need "
                "an S3 backup store (backup_s3_url)"
            )
        raise BlobStoreError(
            f"backup {row.id} of {row.service} is in {row.location}, but this coordinator "
            f"stores backups in {self.blobs.describe()}"
        )

    async def open(
        self, service: str, backup_id: str | None
    ) -> tuple[BackupPublic, AsyncIterator[bytes]]:
        """The backup ``backup_id`` of ``service`` (``None``: the newest) and its bytes,
        checked as they stream; 404 ``no_backup`` when there is none, 503 when its store
        cannot be read."""
        self._check(service)
        rows = await self._db(self._rows, service, backup_id)
        which = f"backup {backup_id!r}" if backup_id else "backup"
        if not rows:
            raise APIError(404, f"no {which} of {service!r}", "no_backup")
        for row in rows:
            blobs = self._blobs_for(row)
            try:
                body = await blobs.open(row.key)
            except BlobMissing:
                log.error("backup %s of %s is listed but gone from %s", row.id, service,
                          blobs.describe())  # fmt: skip
                continue
            info = _public(row)
            return info, self._verified(info, body)
        if backup_id is not None:  # the agent then asks for the newest
            raise APIError(404, f"no {which} of {service!r} (its bytes are gone)", "no_backup")
        raise BlobStoreError(f"the backups of {service!r} are listed but their bytes are gone")

    async def _verified(
        self, info: BackupPublic, body: AsyncIterator[bytes]
    ) -> AsyncIterator[bytes]:
        """``body`` one chunk behind, the last one only once size and SHA-256 match.  A backup
        that does not match leaves the list (its object stays, for a look): the next download
        gets the one before it, instead of failing on this one for ever."""
        digest = hashlib.sha256()
        size = 0
        held: bytes | None = None
        async for chunk in body:
            if held is not None:
                yield held
            digest.update(chunk)
            size += len(chunk)
            held = chunk
        if size != info.size or digest.hexdigest() != info.sha256:
            log.error(
                "backup %s of %s is corrupt in %s: %d bytes, sha256 %s (stored: %d, %s); "
                "it leaves the list",
                info.id, info.service, info.location, size, digest.hexdigest(), info.size,
                info.sha256,
            )  # fmt: skip
            await self._db(self._forget, info.service, info.id)
            raise BackupCorrupt(f"backup {info.id} of {info.service} failed its SHA-256 check")
        if held is not None:
            yield held

    # -- listing --------------------------------------------------------------------------

    def list(self) -> list[BackupPublic]:
        """Every backup kept, by service, newest first."""
        return [_public(row) for row in self._rows()]

    def get(self, service: str, backup_id: str | None) -> BackupPublic | None:
        """The backup ``backup_id`` of ``service`` (``None``: the newest), if it is kept."""
        self._check(service)
        rows = self._rows(service, backup_id)
        return _public(rows[0]) if rows else None

    def summary(self) -> dict[str, dict[str, object]]:
        """The newest backup of each service: time and size (``rma admin services``, stats)."""
        out: dict[str, dict[str, object]] = {}
        for info in self.list():
            if info.service not in out:
                out[info.service] = {"at": info.created_at.isoformat(), "size": info.size}
        return out
