"""Backups of data services (catalog ``backup``), and their restore on a new holder.

- ``pg_dumpall``: ``pg_dumpall`` over TCP (every database, roles included) into a SQL file;
  restored with ``psql -f`` once the new holder's (fresh) cluster answers, before the service is
  reported healthy.
- ``redis-rdb``: ``SAVE`` (a consistent snapshot), then a copy of ``dump.rdb``; restored by
  putting it in the new holder's folder before ``redis-server`` starts (which loads it).

A holder restores only into an empty service folder (its first start of that service): a holder
that restarts keeps its own, newer data.  A restore that fails midway leaves a marker, and the
next attempt starts from an empty folder again.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from rma.agent.programs import find_program
from rma.agent.runtimes.base import Inside
from rma.schemas.api import ServiceSpec

#: Left in a service's folder while a restore runs: found at the next start, the folder is wiped.
RESTORING = ".rma-restoring"
#: Marks the folder of a data service with a backup (its authoritative copy may move away).
MARK = ".rma-data-service"
#: Where the folders of data services no longer assigned here go (the newest of each is kept).
RETIRED = ".retired"


class BackupError(Exception):
    """A backup or a restore failed (the message says why)."""


@dataclass(frozen=True)
class Method:
    name: str
    suffix: str
    #: ``True``: restored into the folder before the service starts; else once it answers.
    before_start: bool


METHODS = {
    "pg_dumpall": Method("pg_dumpall", ".sql", before_start=False),
    "redis-rdb": Method("redis-rdb", ".rdb", before_start=True),
}


def method_of(spec: ServiceSpec) -> Method | None:
    return METHODS.get(spec.backup) if spec.backup else None


def needs_restore(data_dir: Path) -> bool:
    """A first start here: the service's folder is missing or empty, or a restore broke."""
    if (data_dir / RESTORING).exists():
        shutil.rmtree(data_dir, ignore_errors=True)
        return True
    return not data_dir.is_dir() or all(p.name == MARK for p in data_dir.iterdir())


def begin_restore(data_dir: Path, dest: Path) -> None:
    """Mark the folder as being restored (until :func:`end_restore`), make room for the file."""
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / RESTORING).touch()
    dest.parent.mkdir(parents=True, exist_ok=True)


def mark(data_dir: Path) -> None:
    """This folder holds a data service's copy (retired when it is no longer assigned here)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / MARK).touch()


def retire_stale(services_dir: Path, keep: set[str]) -> list[str]:
    """Move aside the copies of data services not assigned here any more (``keep``: those
    that are): their authoritative copy lives on another holder now, and a stale copy must
    never start again as if it were current (a later assignment restores the newest backup).
    Returns the services retired."""
    retired: list[str] = []
    if not services_dir.is_dir():
        return retired
    for folder in services_dir.iterdir():
        name = folder.name
        if name.startswith(".") or name in keep or not (folder / MARK).exists():
            continue
        retire(folder)
        retired.append(name)
    return retired


def retire(folder: Path) -> None:
    """Move a service's folder to ``.retired/<service>`` beside it (replacing an older one)."""
    if not folder.exists():
        return
    dest = folder.parent / RETIRED / folder.name
    shutil.rmtree(dest, ignore_errors=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    folder.rename(dest)


def end_restore(data_dir: Path, src: Path | None) -> None:
    """The restore is complete (or there was nothing to restore): drop the marker and file."""
    (data_dir / RESTORING).unlink(missing_ok=True)
    if src is not None:
        src.unlink(missing_ok=True)


async def _run(argv: list[str], env: dict[str, str], what: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    _, err = await proc.communicate()
    if proc.returncode != 0:
        tail = err.decode("utf-8", "replace").strip()[-400:]
        raise BackupError(f"{what} failed (exit {proc.returncode}): {tail}")


def _pg_program(name: str) -> str:
    """``name`` beside the ``initdb`` the service runs (same PostgreSQL version)."""
    initdb = find_program("initdb")
    if initdb is not None:
        beside = os.path.join(os.path.dirname(os.path.realpath(initdb)), name)
        if os.access(beside, os.X_OK):
            return beside
    found = find_program(name)
    if found is None:
        raise BackupError(f"{name} is not installed")
    return found


def _pg_env(spec: ServiceSpec) -> dict[str, str]:
    env = {**os.environ, "PGCONNECT_TIMEOUT": "10"}
    password = spec.env.get("POSTGRES_PASSWORD")
    if password:
        env["PGPASSWORD"] = password
    return env


#: The dump and the file to restore, in the service's folder while a tool inside its container
#: writes or reads them (removed at once after).
DUMP_NAME = ".rma-backup.sql"
LOAD_NAME = ".rma-restore.sql"


async def take(
    spec: ServiceSpec, port: int, data_dir: Path, dest: Path, inside: Inside | None = None
) -> None:
    """Write a backup of the running service (on 127.0.0.1:``port``) to ``dest``; with
    ``inside``, ``pg_dumpall`` runs in the service's container (into its folder, then moved)."""
    method = method_of(spec)
    if method is None:
        raise BackupError(f"service {spec.name} has no backup method")
    tmp = dest.with_name(dest.name + ".part")
    try:
        if method.name == "pg_dumpall" and inside is not None:
            dumped = data_dir / DUMP_NAME
            try:
                argv = ["pg_dumpall", "-h", "127.0.0.1", "-p", str(inside.port), "-U", "postgres"]
                argv += ["-f", f"{inside.data_dir}/{DUMP_NAME}"]
                await _run_inside(inside, argv, spec, "pg_dumpall (in its container)")
                shutil.move(dumped, tmp)
            finally:
                dumped.unlink(missing_ok=True)
        elif method.name == "pg_dumpall":
            argv = [_pg_program("pg_dumpall"), "-h", "127.0.0.1", "-p", str(port)]
            argv += ["-U", "postgres", "-f", str(tmp)]
            await _run(argv, _pg_env(spec), "pg_dumpall")
        else:
            await _redis_save(port)
            shutil.copyfile(data_dir / "dump.rdb", tmp)
        tmp.replace(dest)
    finally:
        tmp.unlink(missing_ok=True)


async def _run_inside(inside: Inside, argv: list[str], spec: ServiceSpec, what: str) -> None:
    env = {"PGCONNECT_TIMEOUT": "10"}
    password = spec.env.get("POSTGRES_PASSWORD")
    if password:
        env["PGPASSWORD"] = password
    try:
        code, output = await inside.run(argv, env)
    except Exception as exc:  # the engine refused the exec (container gone, engine down)
        raise BackupError(f"{what}: {type(exc).__name__}: {exc}") from None
    if code != 0:
        raise BackupError(f"{what} failed (exit {code}): {output.strip()[-400:]}")


async def _redis_save(port: int) -> None:
    async with asyncio.timeout(120):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(b"SAVE\r\n")
            await writer.drain()
            answer = await reader.readline()
        finally:
            writer.close()
    if not answer.startswith(b"+OK"):
        raise BackupError(f"redis SAVE: {answer.decode('utf-8', 'replace').strip()}")


def restore_before_start(spec: ServiceSpec, data_dir: Path, src: Path) -> None:
    """Put the backup where the service finds it at start (``redis-rdb``)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, data_dir / "dump.rdb")


async def restore_after_start(
    spec: ServiceSpec,
    port: int,
    src: Path,
    inside: Inside | None = None,
    data_dir: Path | None = None,
) -> None:
    """Load the backup into the running, fresh service (``pg_dumpall``); with ``inside``,
    ``psql`` runs in the service's container, reading the file from its folder."""
    if inside is not None and data_dir is not None:
        staged = data_dir / LOAD_NAME
        try:
            shutil.copyfile(src, staged)
            argv = ["psql", "-h", "127.0.0.1", "-p", str(inside.port), "-U", "postgres"]
            argv += ["-d", "postgres", "-q", "-X", "-f", f"{inside.data_dir}/{LOAD_NAME}"]
            await _run_inside(inside, argv, spec, "psql restore (in its container)")
        finally:
            staged.unlink(missing_ok=True)
        return
    argv = [_pg_program("psql"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres"]
    argv += ["-d", "postgres", "-q", "-X", "-f", str(src)]
    # without ON_ERROR_STOP: "role postgres already exists" and the like are expected
    await _run(argv, _pg_env(spec), "psql restore")
