"""Run the system's PostgreSQL: ``python -m rma.agent.postgres --port P --data-dir D``.

The process runtime's command for the catalog's ``postgres`` service.  It finds ``initdb`` (on
``PATH`` or under ``/usr/lib/postgresql/*/bin``), creates a cluster in ``D/pgdata`` on the first
start (user ``postgres``; password ``$POSTGRES_PASSWORD`` with SCRAM, or trust when unset), then
*becomes* ``postgres`` (``exec``: same pid, so the runtime's signals reach the server itself),
listening on 127.0.0.1 only, on the port the agent chose, with no Unix socket.

PostgreSQL refuses to run as root.  An agent running as root gets it run inside a new user
namespace, where it is not root (its files still belong to the agent's user); where the kernel
refuses that, as the system user ``postgres`` (its cluster folder is handed to that user, which
must be able to reach it).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import pwd
import shutil
import subprocess
import sys
from pathlib import Path

from rma.agent.programs import find_program

CLONE_NEWUSER = 0x10000000
#: The cluster's folder inside the service's data folder.
CLUSTER = "pgdata"


class LaunchError(Exception):
    """PostgreSQL cannot be started here (the message says why)."""


def binaries() -> tuple[str, str]:
    """``initdb`` and the ``postgres`` server of the same installation."""
    initdb = find_program("initdb")
    if initdb is None:
        raise LaunchError(
            "initdb is not installed (install PostgreSQL: apt-get install postgresql)"
        )
    bindir = os.path.dirname(os.path.realpath(initdb))
    server = os.path.join(bindir, "postgres")
    if not os.access(server, os.X_OK):
        raise LaunchError(f"no postgres server beside {initdb}")
    return os.path.join(bindir, "initdb"), server


def _leave_root(data_dir: Path) -> None:
    """Stop being root: a new user namespace, else the ``postgres`` system user (who then
    gets ``data_dir``)."""
    if os.geteuid() != 0:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWUSER) == 0:
        return  # uid 65534 inside; files are still created as the agent's user
    try:
        user = pwd.getpwnam("postgres")
    except KeyError:
        raise LaunchError(
            "PostgreSQL does not run as root, this kernel refuses a user namespace, and there "
            "is no postgres user: run the agent as a normal user"
        ) from None
    for path in [data_dir, *data_dir.rglob("*")]:
        os.lchown(path, user.pw_uid, user.pw_gid)
    os.setgroups([])
    os.setgid(user.pw_gid)
    os.setuid(user.pw_uid)


def init_cluster(initdb: str, cluster: Path, password: str | None) -> None:
    """``initdb`` into a temporary folder, renamed when complete (a crash leaves no half)."""
    if (cluster / "PG_VERSION").exists():
        return
    tmp = cluster.with_name(CLUSTER + ".init")
    shutil.rmtree(tmp, ignore_errors=True)
    argv = [initdb, "-D", str(tmp), "-U", "postgres", "-E", "UTF8", "--locale=C", "-N"]
    pwfile = cluster.with_name("pwfile")
    if password:
        fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(password + "\n")
        argv += ["--auth=scram-sha-256", f"--pwfile={pwfile}"]
    else:
        argv += ["--auth=trust"]
    try:
        res = subprocess.run(argv, capture_output=True, text=True, check=False)
    finally:
        pwfile.unlink(missing_ok=True)
    if res.returncode != 0:
        raise LaunchError(f"initdb failed: {(res.stderr or res.stdout).strip()[-500:]}")
    tmp.rename(cluster)


def server_argv(server: str, cluster: Path, port: int) -> list[str]:
    return [
        server,
        "-D",
        str(cluster),
        "-p",
        str(port),
        "-h",
        "127.0.0.1",  # loopback only: clients come through the agent's tunnel
        "-k",
        "",  # no Unix socket
        "-c",
        "logging_collector=off",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rma.agent.postgres", description=__doc__)
    parser.add_argument("--port", type=int, required=True, help="TCP port on 127.0.0.1.")
    parser.add_argument("--data-dir", type=Path, required=True, help="The service's folder.")
    args = parser.parse_args(argv)
    data_dir: Path = args.data_dir.resolve()
    cluster = data_dir / CLUSTER
    try:
        initdb, server = binaries()
        data_dir.mkdir(parents=True, exist_ok=True)
        _leave_root(data_dir)
        init_cluster(initdb, cluster, os.environ.get("POSTGRES_PASSWORD") or None)
        sys.stdout.flush()
        os.execv(server, server_argv(server, cluster, args.port))  # noqa: S606 - no shell
    except (LaunchError, OSError) as exc:
        print(f"rma: postgres: {exc}", file=sys.stderr)
        return 1
    return 0  # not reached: exec


if __name__ == "__main__":
    sys.exit(main())
