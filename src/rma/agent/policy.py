"""What this donor allows, checked before any runtime starts anything.

The coordinator decides *which* services a worker runs; the donor decides *what* may run on the
machine at all.  :meth:`Policy.check` turns the coordinator's assignments into what the runtime
may start:

- only services defined in the donor's own catalog (built-in + ``--catalog``), by name, and only
  those in the ``--services`` allow-list when one is given;
- the donor's definition is what runs: an assignment whose ``command``, ``args``, ``image``,
  ``env``, ``volumes``, ``models``, ``model_pull`` (what the agent downloads) or ``backup``
  (what it uploads) differ from it is refused (``--trust-coordinator-catalog`` runs the
  coordinator's definitions instead, for a donor who runs their own coordinator);
- never a host path as a volume from the coordinator (a bind mount), even when trusted;
- the accepted services together fit in the donor's ``--max-memory`` and ``--max-vram`` (CPU
  time is shared: each service is capped at ``--max-cpu`` by its runtime); what does not fit is
  refused.

A refused service is logged, reported in heartbeats as ``refused`` with the reason, and the
coordinator records an ``assignment_refused`` event.  :func:`coordinator_problem` is the other
half: plain ``http://`` only to this machine unless ``--insecure``.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from rma.schemas.api import Capabilities, GpuInfo, ServiceSpec
from rma.settings import WorkerSettings, parse_size

__all__ = ["Limits", "Policy", "Verdict", "coordinator_problem", "parse_size"]

#: The fields that decide what runs; an assignment may not change them.
GUARDED = ("command", "args", "image", "env", "volumes", "models", "model_pull", "backup")

#: A docker named volume; anything else (``/host/path``, ``./dir``, ``~/x``) is a bind mount.
_NAMED_VOLUME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def format_mb(mb: int) -> str:
    return f"{mb / 1024:g}G" if mb >= 1024 and mb % 1024 == 0 else f"{mb}M"


@dataclass(frozen=True, slots=True)
class Limits:
    """What the pool may use on this machine; ``None``: no limit of that kind."""

    cpu: float | None = None
    memory_mb: int | None = None
    vram_mb: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {"cpu": self.cpu, "memory_mb": self.memory_mb, "vram_mb": self.vram_mb}


def clip_capabilities(caps: Capabilities, limits: Limits) -> Capabilities:
    """The capabilities the coordinator plans with: the machine's, cut down to the limits."""
    update: dict[str, Any] = {}
    if limits.cpu is not None:
        update["cpu_cores"] = max(1, min(caps.cpu_cores, math.floor(limits.cpu)))
    if limits.memory_mb is not None:
        update["memory_mb"] = min(caps.memory_mb, limits.memory_mb)
        if caps.memory_available_mb is not None:
            update["memory_available_mb"] = min(caps.memory_available_mb, limits.memory_mb)
    if limits.vram_mb is not None and caps.gpus:
        left = limits.vram_mb
        gpus: list[GpuInfo] = []
        for g in caps.gpus:
            share = min(g.memory_mb, left)
            left -= share
            if share > 0:
                free = None if g.memory_free_mb is None else min(g.memory_free_mb, share)
                gpus.append(g.model_copy(update={"memory_mb": share, "memory_free_mb": free}))
        update["gpus"] = gpus
    return caps.model_copy(update=update) if update else caps


def bind_mounts(spec: ServiceSpec) -> list[str]:
    """The volume sources of ``spec`` that are host paths, not docker named volumes."""
    return [src for src in spec.volumes.values() if not _NAMED_VOLUME.match(src)]


def differences(mine: ServiceSpec, theirs: ServiceSpec) -> list[str]:
    """The guarded fields in which the coordinator's definition differs from the donor's."""
    return [f for f in GUARDED if getattr(mine, f) != getattr(theirs, f)]


def coordinator_problem(url: str, insecure: bool, pinned: bool = False) -> str | None:
    """Why the agent must not talk to ``url`` (or to one of ``URL1,URL2``), or ``None``.

    Plain ``http://`` is only for a coordinator on this machine (a loopback address,
    ``localhost``): elsewhere anyone on the path could read the credentials and, worse, send this
    machine assignments.  ``--insecure`` allows it anyway.
    """
    from rma.client import split_urls

    for one in split_urls(url):
        problem = _one_problem(one, insecure, pinned)
        if problem is not None:
            return problem
    return None


def _one_problem(url: str, insecure: bool, pinned: bool) -> str | None:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        return f"--coordinator must be an http:// or https:// URL, not {url!r}"
    if scheme == "http" and pinned:
        return f"--ca-hash pins a TLS certificate: the coordinator URL must be https://, not {url}"
    if scheme == "https" or insecure or is_loopback(parts.hostname):
        return None
    return (
        f"refusing plain http:// to {parts.hostname}, which is not this machine: use the "
        "coordinator's https:// URL (with --ca-hash from `rma admin tokens create`), or pass "
        "--insecure if you accept that anyone on the network can impersonate it"
    )


def is_loopback(host: str) -> bool:
    """A loopback address or ``localhost`` (no DNS: a name could resolve anywhere)."""
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True, slots=True)
class Verdict:
    """What :meth:`Policy.check` decided: the specs to run, and the refused ones with why."""

    accepted: list[ServiceSpec]
    refused: dict[str, str]


class Policy:
    """This donor's rules: its catalog, its allow-list, its limits."""

    def __init__(
        self,
        catalog: Mapping[str, ServiceSpec],
        *,
        services: Collection[str] | None = None,
        limits: Limits | None = None,
        trust_coordinator_catalog: bool = False,
    ) -> None:
        self.catalog = catalog
        self.services = frozenset(services) if services is not None else None
        self.limits = limits or Limits()
        self.trust_coordinator_catalog = trust_coordinator_catalog

    def allowed(self, name: str) -> bool:
        """Whether the allow-list (``--services``) lets this service run here."""
        return self.services is None or name in self.services

    def fits(self, spec: ServiceSpec) -> str | None:
        """Why one service alone exceeds the limits, or ``None``."""
        r, lim = spec.resources, self.limits
        if lim.memory_mb is not None and r.memory_mb > lim.memory_mb:
            return (
                f"needs {r.memory_mb} MB of memory, over this donor's "
                f"--max-memory {lim.memory_mb} MB"
            )
        if lim.vram_mb is not None and r.vram_mb > lim.vram_mb:
            return f"needs {r.vram_mb} MB of VRAM, over this donor's --max-vram {lim.vram_mb} MB"
        if lim.vram_mb is not None and lim.vram_mb <= 0 and spec.gpu:
            return "needs a GPU, and this donor gives none (--max-vram 0)"
        return None

    def runnable(self, names: Iterable[str]) -> list[str]:
        """``names`` that the allow-list and the limits let run (sent at registration)."""
        out = []
        for name in names:
            spec = self.catalog.get(name)
            if spec is not None and self.allowed(name) and self.fits(spec) is None:
                out.append(name)
        return out

    def refusal(self, spec: ServiceSpec) -> tuple[ServiceSpec | None, str | None]:
        """One assignment on its own: (what to run, ``None``) or (``None``, why it is refused)."""
        name = spec.name
        if not self.allowed(name):
            return None, f"{name} is not in this donor's --services allow-list"
        mine = self.catalog.get(name)
        if self.trust_coordinator_catalog:
            run = spec
            mounts = [
                m for m in bind_mounts(spec) if mine is None or m not in mine.volumes.values()
            ]
            if mounts:
                return None, (
                    f"the coordinator's definition of {name} mounts host path(s) "
                    f"{', '.join(sorted(mounts))}; define it in your own --catalog to allow that"
                )
        else:
            if mine is None:
                return None, (
                    f"{name} is not defined in this donor's catalog (built-in + --catalog); "
                    "add it there, or pass --trust-coordinator-catalog"
                )
            changed = differences(mine, spec)
            if changed:
                return None, (
                    f"the coordinator's definition of {name} differs from this donor's in "
                    f"{', '.join(changed)}; run the same --catalog on both, or pass "
                    "--trust-coordinator-catalog"
                )
            # the definition is the donor's; where it runs (GPU index, VRAM share) is placement,
            # the coordinator's to say (checked by the schema: small indices, a share in (0, 1])
            run = mine.model_copy(
                update={"gpu_devices": list(spec.gpu_devices), "gpu_share": spec.gpu_share}
            )
        why = self.fits(run)
        return (None, why) if why else (run, None)

    def check(self, assignments: Iterable[ServiceSpec]) -> Verdict:
        """The assignments this donor accepts (in order, within the limits together)."""
        accepted: list[ServiceSpec] = []
        refused: dict[str, str] = {}
        memory = vram = 0  # CPU time is shared (each service is capped); memory is not
        lim = self.limits
        for spec in assignments:
            if spec.name in refused or any(s.name == spec.name for s in accepted):
                continue  # a name twice: the first one counts
            run, why = self.refusal(spec)
            if run is None:
                refused[spec.name] = why or "refused"
                continue
            r = run.resources
            over = []
            if lim.memory_mb is not None and memory + r.memory_mb > lim.memory_mb:
                over.append(f"--max-memory {lim.memory_mb} MB")
            if lim.vram_mb is not None and vram + r.vram_mb > lim.vram_mb:
                over.append(f"--max-vram {lim.vram_mb} MB")
            if over:
                refused[spec.name] = (
                    f"{spec.name} does not fit with the other services in {', '.join(over)}"
                )
                continue
            memory += r.memory_mb
            vram += r.vram_mb
            accepted.append(run)
        return Verdict(accepted, refused)

    def to_json(self) -> dict[str, Any]:
        """For ``rma worker status``."""
        return {
            "allowed_services": sorted(self.services) if self.services is not None else None,
            "limits": self.limits.to_json(),
            "trust_coordinator_catalog": self.trust_coordinator_catalog,
        }


def policy_from(settings: WorkerSettings, catalog: Mapping[str, ServiceSpec]) -> Policy:
    """The policy a ``rma worker join`` with these settings enforces."""
    return Policy(
        catalog,
        services=settings.services,
        limits=Limits(settings.max_cpu, settings.max_memory, settings.max_vram),
        trust_coordinator_catalog=settings.trust_coordinator_catalog,
    )
