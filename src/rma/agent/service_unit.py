"""``rma worker service install|uninstall|status``: the agent as a system service.

Linux: a systemd unit (``--user``: ``~/.config/systemd/user/rma-worker.service``, started with
the user's session, or at boot with ``loginctl enable-linger``; ``--system``:
``/etc/systemd/system/rma-worker.service`` with ``User=`` the installing user).  macOS: a launchd
property list (``~/Library/LaunchAgents/org.rma.worker.plist``, or ``/Library/LaunchDaemons`` with
``--system``).  Both run ``rma worker join`` with the given options and an absolute ``--data-dir``
(the identity lives there, so a restarted service re-joins as the same worker), restart it when it
fails, and stop it with SIGTERM (it drains and leaves).  A ``--token`` is not written into the
unit: it goes to ``<data-dir>/service.env`` (0600), read by the unit (systemd) or kept in the
user-only plist (launchd); only the first join needs it.
"""

from __future__ import annotations

import getpass
import os
import plistlib
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from rma.agent.state import ensure_dir, write_private

UNIT_NAME = "rma-worker.service"
LAUNCHD_LABEL = "org.rma.worker"
ENV_FILE = "service.env"

Platform = Literal["linux", "macos"]


class ServiceError(Exception):
    """The service cannot be installed, removed or queried as asked."""


def this_platform() -> Platform:
    if sys.platform == "darwin":
        return "macos"
    if sys.platform.startswith("linux"):
        return "linux"
    raise ServiceError(
        f"no service manager support on {sys.platform}: on Windows, create a Task Scheduler "
        "task that runs `rma worker join ...` at logon (see docs/donors.md)"
    )


@dataclass
class ServicePlan:
    """What ``install`` writes: where, and the text."""

    platform: Platform
    scope: Literal["user", "system"]
    path: Path
    text: str
    argv: list[str]
    data_dir: Path
    env: dict[str, str]

    def to_json(self) -> dict[str, Any]:
        return {
            "platform": self.platform,
            "scope": self.scope,
            "path": str(self.path),
            "argv": self.argv,
            "data_dir": str(self.data_dir),
        }


def split_token(args: list[str]) -> tuple[list[str], str | None]:
    """``args`` without ``--token X`` / ``--token=X``, and the token."""
    out: list[str] = []
    token = None
    it = iter(args)
    for a in it:
        if a == "--token":
            token = next(it, None)
        elif a.startswith("--token="):
            token = a.split("=", 1)[1]
        elif a == "--data-dir" or a.startswith("--data-dir="):
            raise ServiceError("pass --data-dir to `service install` itself, not as a join option")
        else:
            out.append(a)
    return out, token


def join_argv(data_dir: Path, join_args: list[str]) -> list[str]:
    return [sys.executable, "-m", "rma", "worker", "join", "--data-dir", str(data_dir), *join_args]


def systemd_quote(arg: str) -> str:
    """One ExecStart word: ``%`` and ``$`` escaped, quoted when it holds blanks or quotes."""
    arg = arg.replace("%", "%%").replace("$", "$$")
    if arg and not any(c in arg for c in " \t\"'\\;"):
        return arg
    return '"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"'


def systemd_unit(argv: list[str], data_dir: Path, scope: str, user: str | None) -> str:
    lines = [
        "[Unit]",
        "Description=rma worker: this machine donates its idle time to an rma pool",
        "Wants=network-online.target",
        "After=network-online.target",
        "",
        "[Service]",
        "Type=simple",
        "ExecStart=" + " ".join(systemd_quote(a) for a in argv),
        "EnvironmentFile=-" + str(data_dir / ENV_FILE).replace("%", "%%"),
        "Environment=PYTHONUNBUFFERED=1",
    ]
    if scope == "system" and user:
        lines.append(f"User={user}")
    lines += [
        "Restart=on-failure",
        "RestartSec=15",
        "KillSignal=SIGTERM",
        "TimeoutStopSec=120",
        "Nice=10",
        "",
        "[Install]",
        f"WantedBy={'multi-user.target' if scope == 'system' else 'default.target'}",
        "",
    ]
    return "\n".join(lines)


def launchd_plist(
    argv: list[str], data_dir: Path, scope: str, user: str | None, env: dict[str, str]
) -> str:
    doc: dict[str, Any] = {
        "Label": LAUNCHD_LABEL,
        "ProgramArguments": argv,
        "RunAtLoad": True,
        "KeepAlive": {"SuccessfulExit": False},  # restart when it fails, not after a clean leave
        "ThrottleInterval": 15,
        "ProcessType": "Background",
        "LowPriorityIO": True,
        "Nice": 10,
        "ExitTimeOut": 120,
        "WorkingDirectory": str(data_dir),
        "StandardOutPath": str(data_dir / "agent.log"),
        "StandardErrorPath": str(data_dir / "agent.log"),
        "EnvironmentVariables": {"PYTHONUNBUFFERED": "1", **env},
    }
    if scope == "system" and user:
        doc["UserName"] = user
    return plistlib.dumps(doc).decode()


def plan(
    data_dir: Path,
    join_args: list[str],
    *,
    scope: Literal["user", "system"] = "user",
    platform: Platform | None = None,
    unit_dir: Path | None = None,
    user: str | None = None,
) -> ServicePlan:
    platform = platform or this_platform()
    data_dir = data_dir.expanduser().resolve()
    args, token = split_token(join_args)
    argv = join_argv(data_dir, args)
    env = {"RMA_TOKEN": token} if token else {}
    user = user or getpass.getuser()
    if platform == "linux":
        default = (
            Path("/etc/systemd/system")
            if scope == "system"
            else Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
            / "systemd"
            / "user"
        )
        path = (unit_dir or default) / UNIT_NAME
        text = systemd_unit(argv, data_dir, scope, user)
    else:
        default = (
            Path("/Library/LaunchDaemons")
            if scope == "system"
            else Path.home() / "Library" / "LaunchAgents"
        )
        path = (unit_dir or default) / f"{LAUNCHD_LABEL}.plist"
        text = launchd_plist(argv, data_dir, scope, user, env)
    return ServicePlan(platform, scope, path, text, argv, data_dir, env)


def systemd_running() -> bool:
    """Whether systemd is this machine's init (PID 1), so that ``systemctl`` can enable units."""
    return Path("/run/systemd/system").is_dir()


def _run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        raise ServiceError(f"{' '.join(cmd)}: {exc}") from None


def _systemctl(scope: str, *args: str) -> list[str]:
    return ["systemctl", *(["--user"] if scope == "user" else []), *args]


def install(p: ServicePlan, *, enable: bool = True) -> list[str]:
    """Write the unit (and the token file), then enable and start it; returns what was run."""
    ensure_dir(p.data_dir)
    if p.env and p.platform == "linux":
        write_private(p.data_dir / ENV_FILE, "".join(f"{k}={v}\n" for k, v in p.env.items()))
    try:
        p.path.parent.mkdir(parents=True, exist_ok=True)
        if p.platform == "macos":
            write_private(p.path, p.text)  # it may hold the token: the user's only
        else:
            p.path.write_text(p.text)
    except OSError as exc:
        hint = " (a --system unit needs root: sudo)" if p.scope == "system" else ""
        raise ServiceError(f"cannot write {p.path}: {exc.strerror}{hint}") from None
    if not enable:
        return []
    return _enable(p)


def _enable(p: ServicePlan) -> list[str]:
    if p.platform == "linux":
        if not systemd_running() or shutil.which("systemctl") is None:
            raise ServiceError(
                f"wrote {p.path}, but systemd does not run this machine: start "
                "`rma worker join` another way (or install again with --no-enable)"
            )
        cmds = [
            _systemctl(p.scope, "daemon-reload"),
            _systemctl(p.scope, "enable", "--now", UNIT_NAME),
        ]
    else:
        domain = "system" if p.scope == "system" else f"gui/{os.getuid()}"
        cmds = [["launchctl", "bootstrap", domain, str(p.path)]]
    for cmd in cmds:
        res = _run(cmd)
        if res.returncode != 0:
            raise ServiceError(f"{' '.join(cmd)} failed: {(res.stderr or res.stdout).strip()}")
    return [" ".join(c) for c in cmds]


def uninstall(p: ServicePlan, *, disable: bool = True) -> bool:
    """Stop and disable the service, remove its file; ``False`` when none was installed."""
    if not p.path.exists():
        return False
    if disable:
        if p.platform == "linux" and systemd_running():
            _run(_systemctl(p.scope, "disable", "--now", UNIT_NAME))
        elif p.platform == "macos":
            domain = "system" if p.scope == "system" else f"gui/{os.getuid()}"
            _run(["launchctl", "bootout", f"{domain}/{LAUNCHD_LABEL}"])
    try:
        p.path.unlink()
        (p.data_dir / ENV_FILE).unlink(missing_ok=True)
    except OSError as exc:
        raise ServiceError(f"cannot remove {p.path}: {exc.strerror}") from None
    if disable and p.platform == "linux" and systemd_running():
        _run(_systemctl(p.scope, "daemon-reload"))
    return True


def unit_state(p: ServicePlan) -> dict[str, Any]:
    """What the service manager says: installed, enabled, active (``None`` where unknown)."""
    state: dict[str, Any] = {"installed": p.path.exists(), "enabled": None, "active": None}
    if not state["installed"]:
        return state
    if p.platform == "linux" and systemd_running() and shutil.which("systemctl"):
        state["enabled"] = _run(_systemctl(p.scope, "is-enabled", UNIT_NAME)).stdout.strip()
        state["active"] = _run(_systemctl(p.scope, "is-active", UNIT_NAME)).stdout.strip()
    elif p.platform == "macos" and shutil.which("launchctl"):
        domain = "system" if p.scope == "system" else f"gui/{os.getuid()}"
        res = _run(["launchctl", "print", f"{domain}/{LAUNCHD_LABEL}"])
        state["enabled"] = "loaded" if res.returncode == 0 else "not loaded"
        state["active"] = "running" if "state = running" in res.stdout else "inactive"
    return state
