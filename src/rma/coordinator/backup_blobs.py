"""Where backups' bytes are kept: the coordinator's data dir, or an S3-compatible bucket.

A :class:`Blobs` stores, streams back and deletes objects by key; the index of what is kept
(service, id, time, size, SHA-256, where) is the ``backup`` table (``coordinator/backups.py``).
Both raise :class:`BlobStoreError` (503 ``backup_store_unavailable``) when the store cannot be
used, and :class:`BlobMissing` when an object is not (or no longer) there.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Protocol

from rma.coordinator.errors import APIError
from rma.coordinator.s3.client import S3Client, S3Error

_CHUNK = 256 * 1024


class BlobStoreError(APIError):
    def __init__(self, message: str) -> None:
        super().__init__(503, message, "backup_store_unavailable")


class BlobMissing(Exception):
    pass


class Blobs(Protocol):
    #: Recorded in each backup's row: which store holds its bytes.
    location: str

    def describe(self) -> str: ...

    async def put(self, key: str, chunks: AsyncIterator[bytes]) -> None: ...

    async def open(self, key: str) -> AsyncIterator[bytes]: ...

    async def delete(self, key: str) -> None: ...

    async def check(self) -> None: ...

    async def aclose(self) -> None: ...


class LocalBlobs:
    """``<root>/<key>``: written under a temporary name, fsynced, then renamed."""

    def __init__(self, root: Path, coordinator: str) -> None:
        self.root = root
        self.location = f"local:{coordinator}"

    def describe(self) -> str:
        return f"the data dir of coordinator {self.location.removeprefix('local:')!r}"

    def path(self, key: str) -> Path:
        return self.root / key

    async def put(self, key: str, chunks: AsyncIterator[bytes]) -> None:
        dest = self.path(key)
        dest.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = dest.with_name(f".{dest.name}.part")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as fh:
                async for chunk in chunks:
                    fh.write(chunk)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, dest)
        except OSError as exc:
            raise BlobStoreError(f"cannot write the backup to {self.describe()}: {exc}") from None
        finally:
            tmp.unlink(missing_ok=True)

    async def open(self, key: str) -> AsyncIterator[bytes]:
        import anyio

        try:
            fh = await anyio.open_file(self.path(key), "rb")
        except FileNotFoundError:
            raise BlobMissing(key) from None
        except OSError as exc:
            raise BlobStoreError(f"cannot read the backup from {self.describe()}: {exc}") from None

        async def body() -> AsyncIterator[bytes]:
            try:
                while chunk := await fh.read(_CHUNK):
                    yield chunk
            finally:
                await fh.aclose()

        return body()

    async def delete(self, key: str) -> None:
        path = self.path(key)
        path.unlink(missing_ok=True)
        path.with_suffix(".json").unlink(missing_ok=True)  # a sidecar of before the index

    async def check(self) -> None:
        return None

    async def aclose(self) -> None:
        return None


class S3Blobs:
    """``<prefix><key>`` in an S3 bucket."""

    def __init__(self, client: S3Client, prefix: str, part_size: int) -> None:
        self.client = client
        self.prefix = prefix
        self.part_size = part_size
        self.location = f"s3:{client.cfg.bucket}"
        #: How the last request to the bucket went (``/readyz``: ``backup_store``).
        self.state = "unknown"

    def describe(self) -> str:
        return self.client.describe()

    def _error(self, doing: str, exc: S3Error) -> BlobStoreError:
        self.state = f"failing: {exc}"
        return BlobStoreError(f"cannot {doing}: {exc}")

    async def put(self, key: str, chunks: AsyncIterator[bytes]) -> None:
        try:
            await self.client.put(self.prefix + key, chunks, self.part_size)
        except S3Error as exc:
            raise self._error("store the backup", exc) from None
        self.state = "ok"

    async def open(self, key: str) -> AsyncIterator[bytes]:
        try:
            _, body = await self.client.get(self.prefix + key)
        except S3Error as exc:
            if exc.code == "NoSuchKey":
                self.state = "ok"
                raise BlobMissing(key) from None
            raise self._error("read the backup", exc) from None
        self.state = "ok"

        async def verified() -> AsyncIterator[bytes]:
            try:
                async for chunk in body:
                    yield chunk
            except S3Error as exc:
                raise self._error("read the backup", exc) from None

        return verified()

    async def delete(self, key: str) -> None:
        try:
            await self.client.delete(self.prefix + key)
        except S3Error as exc:
            raise self._error("delete an old backup", exc) from None
        self.state = "ok"

    async def check(self) -> None:
        try:
            await self.client.list(self.prefix, limit=1)
        except S3Error as exc:
            raise self._error("list the backups", exc) from None
        self.state = "ok"

    async def aclose(self) -> None:
        await self.client.aclose()
