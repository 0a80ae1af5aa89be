"""``rma worker ...``: detect this machine's hardware, join the pool, show the agent's status."""

from __future__ import annotations

import time
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from rma.cli.options import CaFileOpt, CoordinatorOpt, JsonOpt
from rma.cli.output import ago, err, fail, out, print_json, table

if TYPE_CHECKING:
    from rma.agent.hardware import Detection
    from rma.settings import WorkerSettings

app = typer.Typer(
    help="Donate this machine: detect its hardware, join a pool, show the agent.",
    no_args_is_help=True,
)


class RuntimeKind(StrEnum):
    auto = "auto"
    docker = "docker"
    process = "process"


class TransportKind(StrEnum):
    auto = "auto"
    tunnel = "tunnel"
    direct = "direct"


class NetworkKind(StrEnum):
    auto = "auto"
    bridge = "bridge"
    host = "host"


CatalogOpt = Annotated[
    Path | None,
    typer.Option(help="Operator's catalog TOML (the coordinator's decides assignments)."),
]
WorkerDataDirOpt = Annotated[
    Path | None,
    typer.Option(
        "--data-dir",
        envvar="RMA_DATA_DIR",
        help="The agent's state: identity, logs, services (default: ~/.local/share/rma/worker).",
    ),
]


def register(root: typer.Typer) -> None:
    """Attach ``rma worker`` to the root app."""
    root.add_typer(app, name="worker")


def _settings(**flags: Any) -> WorkerSettings:
    from pydantic import ValidationError

    from rma.settings import WorkerSettings

    config = flags.pop("config", None)
    try:
        return WorkerSettings.load(config, **flags)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        fail(f"invalid setting {where}: {first['msg']}")


def _labels(values: list[str] | None) -> dict[str, str] | None:
    if not values:
        return None
    labels: dict[str, str] = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise typer.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="--label")
        labels[key.strip()] = value.strip()
    return labels


# --- detect --------------------------------------------------------------------------------------


def _runnable(detection: Detection, catalog_file: Path | None) -> dict[str, str | None]:
    from rma.agent.runtimes import ProcessRuntime
    from rma.agent.runtimes.base import image_unavailable
    from rma.catalog import CatalogError, load_catalog

    try:
        catalog = load_catalog(catalog_file)
    except CatalogError as exc:
        fail(str(exc))
    process = ProcessRuntime(detection.data_dir)
    gpus = bool(detection.capabilities.gpus)
    result: dict[str, str | None] = {}
    for name, spec in catalog.items():
        by_process = process.unavailable(spec)
        by_docker = image_unavailable(spec, gpus=gpus)
        if by_docker is None and not detection.docker.available:
            by_docker = "no Docker engine answers"
        if by_process is None or by_docker is None:
            result[name] = None
        else:
            result[name] = f"process: {by_process}; docker: {by_docker}"
    return result


@app.command()
def detect(
    json: JsonOpt = False,
    data_dir: WorkerDataDirOpt = None,
    catalog: CatalogOpt = None,
) -> None:
    """Show this machine's CPU, RAM, disk, OS, Docker, NVIDIA GPUs and the tier it would get."""
    from rma.agent.hardware import detect as detect_hardware

    settings = _settings(data_dir=data_dir)
    found = detect_hardware(settings.data_dir)
    doc = found.to_json()
    doc["services"] = _runnable(found, catalog)
    if json:
        print_json(doc)
        return
    caps = found.capabilities
    rows: list[list[Any]] = [
        ["CPU", f"{caps.cpu_model or 'unknown'} ({caps.cpu_cores} cores)"],
        ["RAM", f"{caps.memory_mb} MB total, {caps.memory_available_mb} MB available"],
        ["disk", f"{caps.disk_free_mb} MB free in {found.data_dir}"],
        ["OS", f"{caps.os} {caps.arch}"],
        [
            "Docker",
            f"engine {found.docker.version}"
            if found.docker.available
            else f"absent: {found.docker.reason}",
        ],
    ]
    for g in caps.gpus:
        rows.append(
            [
                f"GPU {g.index}",
                f"{g.name}, {g.memory_mb} MB ({g.memory_free_mb} MB free), "
                f"{g.utilization_percent}% busy, driver {g.driver}",
            ]
        )
    if not caps.gpus:
        rows.append(["GPU", f"absent: {found.gpu_absent}"])
    tier = f"{found.tier} ({found.tier_name})" if found.tier else f"none: {found.tier_refused}"
    rows.append(["tier", tier])
    runnable = [n for n, why in doc["services"].items() if why is None]
    rows.append(["can run", ", ".join(runnable) or "no catalog service"])
    table(None, ["", "this machine"], rows)


# --- join ----------------------------------------------------------------------------------------


def _configure_logging(verbose: bool) -> None:
    import logging

    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
    logger = logging.getLogger("rma.agent")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    logger.propagate = False


@app.command()
def join(
    coordinator: CoordinatorOpt = None,
    token: Annotated[
        str | None,
        typer.Option(
            help="Join token from `rma admin tokens create`; only the first join needs one "
            "(env: RMA_TOKEN).",
            show_default=False,
        ),
    ] = None,
    name: Annotated[str | None, typer.Option(help="Worker name (default: the host name).")] = None,
    label: Annotated[
        list[str] | None,
        typer.Option(
            help="KEY=VALUE label for placement (repeat); rma.services=a,b limits services."
        ),
    ] = None,
    owner: Annotated[
        str | None,
        typer.Option(
            help="Who donates this machine (RMA_OWNER): its credits add up under this name, "
            "and keys of this owner are served first when requests queue."
        ),
    ] = None,
    runtime: Annotated[
        RuntimeKind | None,
        typer.Option(help="How services run: docker when an engine answers (auto), or processes."),
    ] = None,
    transport: Annotated[
        TransportKind | None,
        typer.Option(help="How requests reach this worker: tunnel (auto) or direct HTTP."),
    ] = None,
    catalog: CatalogOpt = None,
    data_dir: WorkerDataDirOpt = None,
    advertise_host: Annotated[
        str | None,
        typer.Option(
            help="Host the coordinator reaches services on, direct transport (default: 127.0.0.1)."
        ),
    ] = None,
    docker_network: Annotated[
        NetworkKind,
        typer.Option(
            envvar="RMA_DOCKER_NETWORK",
            help="Docker networking: publish ports on a bridge, or the host's network "
            "(auto: bridge when the engine has one).",
        ),
    ] = NetworkKind.auto,
    services: Annotated[
        str | None,
        typer.Option(
            "--services",
            help="Only these catalog services may run here, comma-separated (env: RMA_SERVICES).",
            show_default=False,
        ),
    ] = None,
    max_cpu: Annotated[
        float | None,
        typer.Option(
            min=0.01,
            help="CPU cores the pool may use here, e.g. 2 (env: RMA_MAX_CPU).",
            show_default=False,
        ),
    ] = None,
    max_memory: Annotated[
        str | None,
        typer.Option(
            help="Memory the pool may use here, e.g. 4G or 512M (env: RMA_MAX_MEMORY).",
            show_default=False,
        ),
    ] = None,
    max_vram: Annotated[
        str | None,
        typer.Option(
            help="GPU memory the pool may use here, e.g. 8G; 0 for none (env: RMA_MAX_VRAM).",
            show_default=False,
        ),
    ] = None,
    trust_coordinator_catalog: Annotated[
        bool | None,
        typer.Option(
            "--trust-coordinator-catalog",
            help="Run the coordinator's service definitions, not only this machine's catalog "
            "(only for a coordinator you run yourself).",
        ),
    ] = None,
    ca_hash: Annotated[
        str | None,
        typer.Option(
            help="The coordinator's certificate pin, sha256:<hex>, from the join line of "
            "`rma admin tokens create` (env: RMA_CA_HASH).",
            show_default=False,
        ),
    ] = None,
    ca_file: CaFileOpt = None,
    insecure: Annotated[
        bool | None,
        typer.Option(
            "--insecure",
            help="Skip TLS verification and allow plain http:// to another machine (testing only).",
        ),
    ] = None,
    config: Annotated[
        Path | None, typer.Option(help="TOML config file (its worker section).")
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log more.")] = False,
) -> None:
    """Join a pool and run its services here until stopped (Ctrl-C leaves the pool cleanly)."""
    import asyncio
    import signal

    from rma.agent.agent import Agent, AgentExit
    from rma.agent.gpu import Nvml
    from rma.agent.hardware import detect as detect_hardware
    from rma.agent.policy import coordinator_problem, policy_from
    from rma.agent.runtimes import RuntimeFailure, select_runtime
    from rma.agent.state import StateError, agent_key
    from rma.catalog import CatalogError, load_catalog

    settings = _settings(
        config=config,
        coordinator_url=coordinator,
        token=token,
        name=name,
        labels=_labels(label),
        owner=owner,
        runtime=runtime.value if runtime else None,
        transport=transport.value if transport else None,
        catalog=catalog,
        data_dir=data_dir,
        advertise_host=advertise_host,
        ca_file=ca_file,
        insecure=insecure,
        ca_hash=ca_hash,
        services=services,
        max_cpu=max_cpu,
        max_memory=max_memory,
        max_vram=max_vram,
        trust_coordinator_catalog=trust_coordinator_catalog,
    )
    settings = _with_pref_limits(settings)
    problem = coordinator_problem(
        settings.coordinator_url, settings.insecure, bool(settings.ca_hash)
    )
    if problem is not None:
        fail(problem)  # before anything connects anywhere
    _configure_logging(verbose)
    try:
        catalog_services = load_catalog(settings.catalog)
    except CatalogError as exc:
        fail(str(exc))
    policy = policy_from(settings, catalog_services)
    unknown = sorted(n for n in settings.services or () if n not in catalog_services)
    if unknown:
        fail(
            f"--services: {', '.join(unknown)} not in this machine's catalog (built-in + --catalog)"
        )
    found = detect_hardware(settings.data_dir)
    caps = found.capabilities
    bind = "127.0.0.1" if settings.advertise_host.startswith("127.") else "0.0.0.0"
    try:
        rt = select_runtime(
            settings.runtime,
            settings.data_dir,
            agent_key=agent_key(settings.data_dir),
            network=docker_network.value,
            bind_host=bind,
            gpus=bool(caps.gpus),
            limits=policy.limits,
            image_prefix=settings.image_prefix,
        )
    except RuntimeFailure as exc:
        fail(str(exc))
    nvml = Nvml() if caps.gpus else None
    agent = Agent(
        settings, runtime=rt, catalog=catalog_services, capabilities=caps, nvml=nvml, policy=policy
    )
    err.print(
        f"rma worker {agent.name}: joining {settings.coordinator_url} "
        f"(runtime {rt.name}, transport {agent.transport.value}, data dir {settings.data_dir})"
    )

    async def main() -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, agent.request_stop)
        async with agent:
            try:
                return await agent.run()
            except asyncio.CancelledError:
                if agent.forced:
                    return 130
                raise

    try:
        code = asyncio.run(main())
    except KeyboardInterrupt:  # before the agent's own signal handlers were in place
        err.print("interrupted")
        raise typer.Exit(130) from None
    except AgentExit as exc:
        fail(exc.message, exit_code=exc.code or 1)
    except StateError as exc:
        fail(str(exc))
    raise typer.Exit(code)


def _with_pref_limits(settings: WorkerSettings) -> WorkerSettings:
    """The donor limits of ``rma worker prefs set`` where no flag (or env) gave one."""
    from rma.agent.prefs import PrefsError, load_prefs

    try:
        prefs = load_prefs(settings.data_dir)
    except PrefsError as exc:
        fail(str(exc))
    update = {
        k: v for k, v in prefs.limits().items() if v is not None and getattr(settings, k) is None
    }
    return settings.model_copy(update=update) if update else settings


# --- status --------------------------------------------------------------------------------------


def _allowed_line(doc: dict[str, Any]) -> str:
    allowed = doc.get("allowed_services")
    what = ", ".join(allowed) if allowed else "every service in this machine's catalog"
    source = (
        "the coordinator's definitions"
        if doc.get("trust_coordinator_catalog")
        else "this machine's definitions only"
    )
    pin = f"; coordinator pinned to {doc['pinned']}" if doc.get("pinned") else ""
    return f"{what} ({source}){pin}"


def _limits_line(doc: dict[str, Any]) -> str:
    from rma.agent.policy import format_mb

    limits = doc.get("limits") or {}
    how = ((doc.get("runtime") or {}).get("limits")) or {}
    parts = []
    if limits.get("cpu") is not None:
        parts.append(f"cpu {limits['cpu']:g} ({how.get('cpu', 'planned only')})")
    if limits.get("memory_mb") is not None:
        parts.append(
            f"memory {format_mb(limits['memory_mb'])} ({how.get('memory', 'planned only')})"
        )
    if limits.get("vram_mb") is not None:
        parts.append(f"vram {format_mb(limits['vram_mb'])} ({how.get('vram', 'planned only')})")
    return "; ".join(parts) or "none (the whole machine)"


def _served_line(doc: dict[str, Any]) -> str:
    served = doc.get("served") or {}
    if not served:
        return "-"
    line = f"{served.get('today', 0)} today, {served.get('total', 0)} in total"
    if not served.get("counted", True):
        line += " (requests over the direct transport are not counted here)"
    return line


def _uptime(doc: dict[str, Any]) -> str:
    from rma.agent.pause import format_duration

    if not doc.get("running") or not doc.get("started_at"):
        return "-"
    return format_duration(time.time() - float(doc["started_at"]))


def _credits_line(doc: dict[str, Any]) -> str:
    got = doc.get("credits")
    owner = doc.get("owner") or "no owner"
    if not got:
        return f"- ({owner}; known after the next heartbeat)"
    return f"{got['credits']:g} (escrow {got['escrow']:g}; owner {owner})"


@app.command()
def status(json: JsonOpt = False, data_dir: WorkerDataDirOpt = None) -> None:
    """Show what the agent on this machine runs and its last heartbeat."""
    from rma.agent.state import agent_running, load_status

    settings = _settings(data_dir=data_dir)
    doc = load_status(settings.data_dir)
    if doc is None:
        fail(
            f"no agent has run with the data dir {settings.data_dir} "
            "(start one with `rma worker join`)",
            json_mode=json,
            code="not_found",
        )
    pid = agent_running(settings.data_dir)
    doc["running"] = pid is not None
    if pid is None:
        doc["pid"] = None
    elif pid > 0:
        doc["pid"] = pid
    if json:
        print_json(doc)
        return
    from datetime import UTC, datetime

    beat = doc.get("last_heartbeat") or {}
    when = datetime.fromtimestamp(beat["at"], UTC) if beat.get("at") else None
    result = (
        "never"
        if not beat
        else f"ok ({beat.get('status')}) {ago(when)}"
        if beat.get("ok")
        else f"failed {ago(when)}: {beat.get('error')}"
    )
    state = f"running (pid {doc['pid']})" if doc["running"] else "not running"
    donor = doc.get("state") if doc["running"] else "stopped"
    if doc.get("pause_reason") and donor in ("paused", "waiting"):
        donor = f"{donor}: {doc['pause_reason']}"
    runtime = (doc.get("runtime") or {}).get("name")
    out.print(
        f"agent: {state}\nstate: {donor or '-'}\n"
        f"worker: {doc.get('name')} ({doc.get('worker_id') or 'not joined'}), "
        f"tier {doc.get('tier') or '-'}, {doc.get('status') or '-'}\n"
        f"coordinator: {doc.get('coordinator')}  runtime: {runtime}  "
        f"transport: {doc.get('transport')}\nlast heartbeat: {result}\n"
        f"allowed: {_allowed_line(doc)}\nlimits: {_limits_line(doc)}\n"
        f"served: {_served_line(doc)}  uptime: {_uptime(doc)}\n"
        f"credits: {_credits_line(doc)}"
    )
    table(
        None,
        ["SERVICE", "STATE", "HEALTHY", "ENDPOINT", "RESTARTS", "MESSAGE"],
        [
            [
                s["name"],
                s["state"],
                "yes" if s.get("healthy") else "no",
                s.get("endpoint"),
                s.get("restarts", 0),
                s.get("message"),
            ]
            for s in doc.get("services", [])
        ],
    )
    if not doc["running"]:
        age = time.time() - float(doc.get("updated_at") or 0)
        err.print(f"(as of {age:.0f}s ago, when the agent last wrote it)")


# --- pause, resume, preferences (the donor's side) -----------------------------------------------


def _agent_line(data_dir: Path) -> str:
    from rma.agent.state import agent_running

    pid = agent_running(data_dir)
    if pid is None:
        return "no agent runs with this data dir now: the next one starts paused"
    return f"the agent (pid {pid}) sees it within its check interval"


def _wait_state(data_dir: Path, want: set[str], timeout: float) -> dict[str, Any] | None:
    from rma.agent.state import agent_running, load_status

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        doc = load_status(data_dir) or {}
        if doc.get("state") in want or agent_running(data_dir) is None:
            return doc
        time.sleep(0.25)
    return None


WaitOpt = Annotated[
    bool,
    typer.Option(
        "--wait", help="Wait until the agent has done it (services stopped, or serving again)."
    ),
]
WaitTimeoutOpt = Annotated[
    float, typer.Option(help="With --wait: give up after this many seconds.", min=1)
]


@app.command()
def pause(
    for_: Annotated[
        str | None,
        typer.Option(
            "--for",
            help="Resume by itself after this long, e.g. 30m, 2h, 1h30m (default: until resumed).",
            show_default=False,
        ),
    ] = None,
    reason: Annotated[
        str | None, typer.Option(help="Why (shown to the operator).", show_default=False)
    ] = None,
    wait: WaitOpt = False,
    timeout: WaitTimeoutOpt = 120.0,
    json: JsonOpt = False,
    data_dir: WorkerDataDirOpt = None,
) -> None:
    """Pause this machine's agent: finish what is in flight, stop every service, stay joined."""
    from rma.agent.pause import parse_duration, request_pause
    from rma.agent.state import StateError

    seconds = None
    if for_ is not None:
        try:
            seconds = parse_duration(for_)
        except ValueError as exc:
            fail(f"--for: {exc}", json_mode=json, code="bad_request", exit_code=2)
    if reason is not None and len(reason) > 200:
        fail("--reason: at most 200 characters", json_mode=json, code="bad_request", exit_code=2)
    settings = _settings(data_dir=data_dir)
    try:
        req = request_pause(settings.data_dir, seconds, reason)
    except (StateError, OSError) as exc:
        fail(f"cannot write the pause switch: {exc}", json_mode=json)
    doc: dict[str, Any] = {"paused": True, **req.model_dump()}
    if wait:
        got = _wait_state(settings.data_dir, {"paused", "waiting", "stopped"}, timeout)
        if got is None:
            fail(f"the agent did not pause within {timeout:.0f}s", json_mode=json)
        doc["state"] = got.get("state")
    if json:
        print_json(doc)
        return
    err.print(f"paused: {req.describe()}; {_agent_line(settings.data_dir)}")


@app.command()
def resume(
    wait: WaitOpt = False,
    timeout: WaitTimeoutOpt = 600.0,
    json: JsonOpt = False,
    data_dir: WorkerDataDirOpt = None,
) -> None:
    """Resume after `rma worker pause`: the agent starts its services again."""
    from rma.agent.pause import request_resume

    settings = _settings(data_dir=data_dir)
    try:
        had = request_resume(settings.data_dir)
    except OSError as exc:
        fail(f"cannot remove the pause switch: {exc}", json_mode=json)
    doc: dict[str, Any] = {"paused": False, "was_paused": had}
    if wait:
        got = _wait_state(settings.data_dir, {"serving", "waiting", "stopped"}, timeout)
        if got is None:
            fail(f"the agent did not resume within {timeout:.0f}s", json_mode=json)
        doc["state"] = got.get("state")
    if json:
        print_json(doc)
        return
    if not had:
        err.print("it was not paused by `rma worker pause`")
    else:
        err.print("resumed: the agent starts its services again when its preferences allow")


prefs_app = typer.Typer(
    help="Computing preferences: when this machine serves (idle, battery, hours, limits).",
    no_args_is_help=True,
)
app.add_typer(prefs_app, name="prefs")


def _load_prefs(data_dir: Path, json_mode: bool) -> Any:
    from rma.agent.prefs import PrefsError, load_prefs

    try:
        return load_prefs(data_dir)
    except PrefsError as exc:
        fail(str(exc), json_mode=json_mode)


def _print_prefs(prefs: Any, json_mode: bool) -> None:
    from rma.agent.policy import format_mb

    if json_mode:
        print_json(prefs.model_dump())
        return
    idle = (
        "always (no idle requirement)"
        if prefs.idle_minutes is None
        else f"after {prefs.idle_minutes:g} min idle (input idle, else others' CPU below "
        f"{prefs.cpu_idle_below:g}%)"
    )
    rows: list[list[Any]] = [
        ["serve", idle],
        ["on battery", "serve" if prefs.on_battery else "pause"],
        ["hours", prefs.hours or "any time"],
        ["max cpu", "-" if prefs.max_cpu is None else f"{prefs.max_cpu:g} cores"],
        ["max memory", "-" if prefs.max_memory is None else format_mb(prefs.max_memory)],
        ["max vram", "-" if prefs.max_vram is None else format_mb(prefs.max_vram)],
    ]
    table(None, ["", "computing preferences"], rows)


@prefs_app.command("show")
def prefs_show(json: JsonOpt = False, data_dir: WorkerDataDirOpt = None) -> None:
    """Show the computing preferences of the agent of this data dir."""
    settings = _settings(data_dir=data_dir)
    _print_prefs(_load_prefs(settings.data_dir, json), json)


@prefs_app.command("set")
def prefs_set(
    idle_minutes: Annotated[
        float | None,
        typer.Option(
            min=0,
            help="Serve only after the machine was idle this many minutes.",
            show_default=False,
        ),
    ] = None,
    cpu_idle_below: Annotated[
        float | None,
        typer.Option(
            min=1,
            max=100,
            help="Where input idle cannot be read: idle means others' CPU use below this %.",
            show_default=False,
        ),
    ] = None,
    on_battery: Annotated[
        bool | None,
        typer.Option(
            "--on-battery/--not-on-battery",
            help="Serve on battery too, or pause on battery (the default).",
            show_default=False,
        ),
    ] = None,
    hours: Annotated[
        str | None,
        typer.Option(
            help="Serve only in these local hours, e.g. 22:00-07:00 or 9:00-12:00,14:00-18:00.",
            show_default=False,
        ),
    ] = None,
    max_cpu: Annotated[
        float | None,
        typer.Option(min=0.01, help="CPU cores the pool may use here.", show_default=False),
    ] = None,
    max_memory: Annotated[
        str | None,
        typer.Option(help="Memory the pool may use here, e.g. 4G.", show_default=False),
    ] = None,
    max_vram: Annotated[
        str | None,
        typer.Option(
            help="GPU memory the pool may use here, e.g. 8G; 0 for none.", show_default=False
        ),
    ] = None,
    reset: Annotated[
        list[str] | None,
        typer.Option(
            help="Back to the default: idle-minutes, cpu-idle-below, on-battery, hours, max-cpu, "
            "max-memory, max-vram (repeat).",
            show_default=False,
        ),
    ] = None,
    json: JsonOpt = False,
    data_dir: WorkerDataDirOpt = None,
) -> None:
    """Change the computing preferences; a running agent applies them within its check interval
    (limits at its next start)."""
    from rma.agent.prefs import Preferences, PrefsError, update_prefs
    from rma.settings import parse_size

    changes: dict[str, Any] = {}
    fields = set(Preferences.model_fields)
    for name in reset or []:
        key = name.replace("-", "_")
        if key not in fields:
            msg = f"--reset: no preference {name!r}"
            fail(msg, json_mode=json, code="bad_request", exit_code=2)
        changes[key] = Preferences.model_fields[key].default
    try:
        if max_memory is not None:
            changes["max_memory"] = parse_size(max_memory)
        if max_vram is not None:
            changes["max_vram"] = 0 if max_vram.strip() == "0" else parse_size(max_vram)
    except ValueError as exc:
        fail(str(exc), json_mode=json, code="bad_request", exit_code=2)
    for key, value in (
        ("idle_minutes", idle_minutes),
        ("cpu_idle_below", cpu_idle_below),
        ("on_battery", on_battery),
        ("hours", hours),
        ("max_cpu", max_cpu),
    ):
        if value is not None:
            changes[key] = value
    settings = _settings(data_dir=data_dir)
    try:
        prefs = update_prefs(settings.data_dir, changes)
    except PrefsError as exc:
        fail(str(exc), json_mode=json, code="bad_request")
    _print_prefs(prefs, json)


# --- service install | uninstall | status ---------------------------------------------------------

service_app = typer.Typer(
    help="Run the agent as a service (systemd on Linux, launchd on macOS): at boot, restarted "
    "when it fails.",
    no_args_is_help=True,
)
app.add_typer(service_app, name="service")


class Scope(StrEnum):
    user = "user"
    system = "system"


class PlatformKind(StrEnum):
    linux = "linux"
    macos = "macos"


SystemOpt = Annotated[
    bool,
    typer.Option(
        "--system/--user",
        help="A system service (needs root; runs as you) or your user's (the default).",
    ),
]
UnitDirOpt = Annotated[
    Path | None,
    typer.Option(
        help="Write the unit here instead of the service manager's folder (to inspect it).",
        show_default=False,
    ),
]
PlatformOpt = Annotated[
    PlatformKind | None,
    typer.Option(
        help="Write the unit for this platform (default: this machine's).", show_default=False
    ),
]


def _plan(
    data_dir: Path | None,
    system: bool,
    platform: PlatformKind | None,
    unit_dir: Path | None,
    join_args: list[str],
    json_mode: bool,
) -> Any:
    from rma.agent.service_unit import ServiceError, plan

    settings = _settings(data_dir=data_dir)
    try:
        return plan(
            settings.data_dir,
            join_args,
            scope="system" if system else "user",
            platform=platform.value if platform else None,
            unit_dir=unit_dir,
        )
    except ServiceError as exc:
        fail(str(exc), json_mode=json_mode)


@service_app.command(
    "install",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
)
def service_install(
    ctx: typer.Context,
    system: SystemOpt = False,
    enable: Annotated[
        bool,
        typer.Option(
            "--enable/--no-enable", help="Enable and start it now (or only write the unit)."
        ),
    ] = True,
    unit_dir: UnitDirOpt = None,
    platform: PlatformOpt = None,
    json: JsonOpt = False,
    data_dir: WorkerDataDirOpt = None,
) -> None:
    """Install the agent as a service; options after these are `rma worker join` options
    (e.g. --coordinator URL --token T --max-cpu 2)."""
    from rma.agent.service_unit import ServiceError, install

    join_args = list(ctx.args)
    if not any(a == "--coordinator" or a.startswith("--coordinator=") for a in join_args):
        import os

        url = os.environ.get("RMA_COORDINATOR_URL")
        if not url:
            fail("name the pool: --coordinator URL (a join option)", json_mode=json, exit_code=2)
        join_args = ["--coordinator", url, *join_args]
    p = _plan(data_dir, system, platform, unit_dir, join_args, json)
    try:
        ran = install(p, enable=enable)
    except ServiceError as exc:
        fail(str(exc), json_mode=json)
    if json:
        print_json({**p.to_json(), "enabled": bool(ran), "ran": ran})
        return
    err.print(f"wrote {p.path}")
    for cmd in ran:
        err.print(f"ran: {cmd}")
    if not ran:
        err.print("not enabled (--no-enable): the service manager does not start it yet")


@service_app.command("uninstall")
def service_uninstall(
    system: SystemOpt = False,
    unit_dir: UnitDirOpt = None,
    platform: PlatformOpt = None,
    disable: Annotated[
        bool, typer.Option("--disable/--no-disable", help="Stop and disable it first.")
    ] = True,
    json: JsonOpt = False,
    data_dir: WorkerDataDirOpt = None,
) -> None:
    """Stop the service and remove its unit (the identity in the data dir stays)."""
    from rma.agent.service_unit import ServiceError, uninstall

    p = _plan(data_dir, system, platform, unit_dir, [], json)
    try:
        removed = uninstall(p, disable=disable)
    except ServiceError as exc:
        fail(str(exc), json_mode=json)
    if json:
        print_json({"path": str(p.path), "removed": removed})
        return
    err.print(f"removed {p.path}" if removed else f"no service installed at {p.path}")


@service_app.command("status")
def service_status(
    system: SystemOpt = False,
    unit_dir: UnitDirOpt = None,
    platform: PlatformOpt = None,
    json: JsonOpt = False,
    data_dir: WorkerDataDirOpt = None,
) -> None:
    """Show the service's state (installed, enabled, active) and the agent's."""
    from rma.agent.service_unit import unit_state
    from rma.agent.state import agent_running, load_status

    p = _plan(data_dir, system, platform, unit_dir, [], json)
    state = unit_state(p)
    doc = load_status(p.data_dir) or {}
    pid = agent_running(p.data_dir)
    agent = {
        "running": pid is not None,
        "pid": pid,
        "state": doc.get("state") if pid is not None else "stopped",
        "pause_reason": doc.get("pause_reason") if pid is not None else None,
        "status": doc.get("status"),
        "name": doc.get("name"),
    }
    if json:
        print_json({**p.to_json(), "unit": state, "agent": agent})
        return
    enabled = state["enabled"] or "enabled: unknown"
    active = state["active"] or "state unknown"
    unit = f"installed, {enabled}, {active}" if state["installed"] else "not installed"
    what = agent["state"] or "-"
    if agent["pause_reason"]:
        what = f"{what}: {agent['pause_reason']}"
    out.print(f"service: {unit} ({p.path})\nagent: {what}" + (f" (pid {pid})" if pid else ""))


@app.command()
def top(
    data_dir: WorkerDataDirOpt = None,
    refresh: Annotated[float, typer.Option(min=0.2, help="Seconds between updates.")] = 1.0,
) -> None:
    """A live view of this machine's agent: state, services, requests served (p pause, r resume)."""
    from rma.agent.pause import DataDirSource
    from rma.tui.donor import DonorTop

    settings = _settings(data_dir=data_dir)
    DonorTop(DataDirSource(settings.data_dir), refresh=refresh).run()
