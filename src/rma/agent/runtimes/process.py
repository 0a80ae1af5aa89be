"""The process runtime: the catalog's command as a subprocess in its own process group.

Donor limits (``--max-cpu``, ``--max-memory``) are applied to each service as it starts, by a
tiny launcher (``python -I -c``) that sets them and then ``exec``s the service's command (same
pid, same process group; no ``preexec_fn``, which is unsafe in a threaded agent):
``--max-cpu N`` pins it to N of this agent's CPUs (``sched_setaffinity``, N rounded up),
``--max-memory`` caps its data segment (``RLIMIT_DATA``: heap and private anonymous memory, what
a runaway service grows; file mappings such as model weights and reserved-but-unused address
space do not count).  Its children inherit both.

Logs go to ``<data-dir>/logs/<service>.log``.  Each running service leaves a small record in
``<data-dir>/run/<service>.json`` (pid, process group, start time) so that an agent restarted
after a crash (SIGKILL) finds what its predecessor started and stops the whole group.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

import psutil

from rma import install_hint
from rma.agent.policy import Limits
from rma.agent.programs import missing_programs
from rma.agent.runtimes.base import Handle, Runtime, RuntimeFailure, expand
from rma.schemas.api import ServiceSpec

#: Sets the limits given as arguments (CPUs "0,1" or "", data bytes or 0), then becomes the service.
_LAUNCHER = """\
import os, resource, sys
cpus, data, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
if cpus:
    os.sched_setaffinity(0, {int(c) for c in cpus.split(",")})
if data:
    resource.setrlimit(resource.RLIMIT_DATA, (data, data))
try:
    os.execvp(argv[0], argv)
except OSError as exc:
    print(f"rma: cannot start {argv[0]}: {exc.strerror}", file=sys.stderr)
    sys.exit(127)
"""


def _module_missing(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is None
    except (ImportError, ValueError):
        return True


class ProcessRuntime(Runtime):
    name = "process"

    def __init__(
        self, data_dir: Path, *, stop_timeout: float = 10.0, limits: Limits | None = None
    ) -> None:
        self.data_dir = data_dir
        self.limits = limits or Limits()
        self._cpus = _cpu_set(self.limits.cpu)
        self.logs = data_dir / "logs"
        self.run_dir = data_dir / "run"
        self.stop_timeout = stop_timeout
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._missing: dict[str, bool] = {}

    # --- what can run ----------------------------------------------------------------------------

    def unavailable(self, spec: ServiceSpec) -> str | None:
        if not spec.command:
            return "no command for the process runtime (it needs the docker runtime)"
        exe = spec.command[0]
        if exe != "{python}" and shutil.which(exe) is None:
            return f"{exe} is not installed on this machine"
        if lacking := missing_programs(spec.programs):
            return f"{', '.join(lacking)} not installed on this machine"
        missing = [m for m in spec.requires if self._missing_module(m)]
        if missing:
            how = install_hint(spec.extra) if spec.extra else "install them"
            return f"needs the Python module(s) {', '.join(missing)}: {how}"
        return None

    def _missing_module(self, module: str) -> bool:
        if module not in self._missing:
            self._missing[module] = _module_missing(module)
        return self._missing[module]

    # --- lifecycle -------------------------------------------------------------------------------

    async def start(self, spec: ServiceSpec, host_port: int, data_dir: Path) -> Handle:
        return self._spawn(spec, host_port, data_dir)  # fork/exec: fast, no thread needed

    def _spawn(self, spec: ServiceSpec, host_port: int, data_dir: Path) -> Handle:
        reason = self.unavailable(spec)
        if reason or not spec.command:
            raise RuntimeFailure(reason or "no command")
        data_dir.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        share = spec.gpu_share
        command = [
            expand(a, port=host_port, data_dir=data_dir, gpu_share=share) for a in spec.command
        ]
        argv = self.limited(command)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.update(
            {
                k: expand(v, port=host_port, data_dir=data_dir, gpu_share=share)
                for k, v in spec.env.items()
            }
        )
        if spec.gpu_devices:  # the GPU(s) the coordinator placed it on
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in spec.gpu_devices)
        log_path = self.logs / f"{spec.name}.log"
        log: IO[bytes] = open(log_path, "ab")  # noqa: SIM115 - handed to the child
        try:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            log.write(f"\n--- {stamp} rma starts: {' '.join(command)}\n".encode())
            log.flush()
            try:
                proc = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=data_dir,
                    env=env,
                    start_new_session=True,  # its own process group: stopped as a whole
                    close_fds=True,
                )
            except OSError as exc:
                raise RuntimeFailure(f"cannot start {command[0]}: {exc.strerror or exc}") from None
        finally:
            log.close()
        self._procs[spec.name] = proc
        try:
            created = psutil.Process(proc.pid).create_time()
        except psutil.Error:
            created = time.time()
        record = {"service": spec.name, "pid": proc.pid, "pgid": proc.pid, "created": created}
        (self.run_dir / f"{spec.name}.json").write_text(json.dumps(record))
        return Handle(spec.name, host_port, str(proc.pid), proc)

    async def exit_status(self, handle: Handle) -> str | None:
        proc: subprocess.Popen[bytes] = handle.detail
        rc = proc.poll()
        if rc is None:
            return None
        if rc < 0:
            try:
                return f"killed by {signal.Signals(-rc).name}"
            except ValueError:
                return f"killed by signal {-rc}"
        return f"exited with code {rc}"

    async def stop(self, service: str, handle: Handle | None, *, grace: float) -> None:
        proc = handle.detail if handle is not None else self._procs.get(service)
        if proc is None:
            return
        await _stop_group(proc, grace)
        self._procs.pop(service, None)
        with contextlib.suppress(FileNotFoundError):
            (self.run_dir / f"{service}.json").unlink()

    async def cleanup(self) -> list[str]:
        """Stop the process groups an earlier (crashed) agent on this data dir left running."""
        cleaned: list[str] = []
        if not self.run_dir.is_dir():
            return cleaned
        for path in sorted(self.run_dir.glob("*.json")):
            try:
                record = json.loads(path.read_text())
                pgid, created = int(record["pgid"]), float(record["created"])
            except (OSError, ValueError, KeyError, TypeError):
                path.unlink(missing_ok=True)
                continue
            members = _group_members(pgid, created)
            if members:
                await _kill_group(pgid, members, self.stop_timeout)
                cleaned.append(f"{record.get('service', path.stem)} (pid {pgid})")
            path.unlink(missing_ok=True)
        return cleaned

    def log_tail(self, handle: Handle, lines: int = 5) -> str:
        path = self.logs / f"{handle.service}.log"
        try:
            with open(path, "rb") as fh:
                fh.seek(0, os.SEEK_END)
                fh.seek(max(0, fh.tell() - 4096))
                text = fh.read().decode(errors="replace")
        except OSError:
            return ""
        tail = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("--- ")]
        return " | ".join(tail[-lines:])

    def limited(self, argv: list[str]) -> list[str]:
        """``argv``, behind the launcher that applies the donor's limits (when there are any)."""
        cpus, memory_mb = self._cpus, self.limits.memory_mb
        if cpus is None and memory_mb is None:
            return argv
        cpu_arg = ",".join(str(c) for c in sorted(cpus)) if cpus is not None else ""
        data = str(memory_mb << 20) if memory_mb is not None else "0"
        return [sys.executable, "-I", "-c", _LAUNCHER, cpu_arg, data, *argv]

    def enforced(self) -> dict[str, str]:
        """How each donor limit is applied to this runtime's services."""
        out: dict[str, str] = {}
        if self._cpus is not None:
            out["cpu"] = f"CPU affinity: CPUs {','.join(map(str, sorted(self._cpus)))}"
        if self.limits.memory_mb is not None:
            out["memory"] = f"RLIMIT_DATA {self.limits.memory_mb} MB per service process"
        if self.limits.vram_mb is not None:
            out["vram"] = "planned only (the coordinator and the agent keep services within it)"
        return out

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "python": sys.executable,
            "logs": str(self.logs),
            "limits": self.enforced(),
        }


def _cpu_set(cpu: float | None) -> set[int] | None:
    """The CPUs a service may use under ``--max-cpu``: the first N of this agent's own."""
    if cpu is None:
        return None
    try:
        mine = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux: no affinity; the limit is planned only
        return None
    return set(mine[: max(1, math.ceil(cpu))])


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


async def _stop_group(proc: subprocess.Popen[bytes], grace: float) -> None:
    """SIGTERM the whole group, SIGKILL it after ``grace`` seconds; reap the leader."""
    pgid = proc.pid
    _signal_group(pgid, signal.SIGKILL if grace <= 0 else signal.SIGTERM)
    deadline = time.monotonic() + max(grace, 0)
    killed = grace <= 0
    while True:
        proc.poll()  # reap the leader, so a zombie does not keep the group "alive"
        if proc.returncode is not None and not _group_alive(pgid):
            return
        if not killed and time.monotonic() >= deadline:
            _signal_group(pgid, signal.SIGKILL)
            killed = True
        if killed and time.monotonic() >= deadline + 5:
            return  # unkillable (D state); nothing more we can do
        await asyncio.sleep(0.05)


def _group_members(pgid: int, created: float) -> list[psutil.Process]:
    """Processes of group ``pgid`` that are not older than the recorded group (pid reuse)."""
    members: list[psutil.Process] = []
    for p in psutil.process_iter(["create_time"]):
        try:
            if os.getpgid(p.pid) == pgid and p.info["create_time"] >= created - 1:
                members.append(p)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return members


async def _kill_group(pgid: int, members: list[psutil.Process], grace: float) -> None:
    _signal_group(pgid, signal.SIGTERM)
    _, alive = await asyncio.to_thread(psutil.wait_procs, members, grace)
    if alive:
        _signal_group(pgid, signal.SIGKILL)
        await asyncio.to_thread(psutil.wait_procs, alive, 5)
