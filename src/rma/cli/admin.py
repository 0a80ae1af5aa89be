"""``rma admin ...``: the operator's commands over the admin API."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from rma.cli.options import (
    AdminKeyOpt,
    CaFileOpt,
    CoordinatorOpt,
    JsonOpt,
    make_client,
    parse_duration,
)
from rma.cli.output import ago, coloured, err, fail, out, print_json, run_async, table

app = typer.Typer(
    help="Operate the pool: workers, join tokens, API keys, stats, events.", no_args_is_help=True
)
tokens_app = typer.Typer(help="Join tokens for workers.", no_args_is_help=True)
catalog_app = typer.Typer(help="The coordinator's service catalog.", no_args_is_help=True)
keys_app = typer.Typer(help="API keys for clients.", no_args_is_help=True)
app.add_typer(tokens_app, name="tokens")
app.add_typer(keys_app, name="keys")
app.add_typer(catalog_app, name="catalog")

StatusOpt = Annotated[
    str | None,
    typer.Option(
        "--status",
        help="Only workers in this status: online, offline, draining, paused, left, removed.",
    ),
]
WorkerIdArg = Annotated[str, typer.Argument(help="The worker's id (see `rma admin workers`).")]


def _services_cell(services: list[Any]) -> str:
    if not services:
        return "-"
    return " ".join(f"{s.name}{'✓' if s.healthy else '✗'}" for s in services)


def _show_workers(workers: list[Any]) -> None:
    table(
        None,
        ["ID", "NAME", "STATUS", "TIER", "SERVICES", "CPU", "MEM", "REP", "TRANSPORT", "HEARTBEAT"],
        [
            [
                w.id,
                w.name,
                coloured(w.status.value),
                w.tier_name,
                _services_cell(w.services),
                f"{w.load.cpu_percent:.0f}%",
                f"{w.load.memory_percent:.0f}%",
                f"{w.reputation:.2f}{' Q' if w.quarantined else ''}",
                w.transport.value,
                ago(w.last_heartbeat_at),
            ]
            for w in workers
        ],
    )
    if not workers:
        err.print("no workers yet: create a join token with `rma admin tokens create`")


@app.command()
def workers(
    status: StatusOpt = None,
    json: JsonOpt = False,
    coordinator: CoordinatorOpt = None,
    admin_key: AdminKeyOpt = None,
    ca_file: CaFileOpt = None,
) -> None:
    """List the pool's workers."""
    valid = {"online", "offline", "draining", "paused", "left", "removed"}
    if status is not None and status not in valid:
        raise typer.BadParameter(
            f"must be one of {', '.join(sorted(valid))}", param_hint="--status"
        )

    async def go() -> list[Any]:
        async with make_client(coordinator, admin_key, ca_file=ca_file) as c:
            return await c.workers(status)

    result = run_async(go, json_mode=json)
    print_json(result) if json else _show_workers(result)


@app.command()
def worker(
    worker_id: WorkerIdArg,
    json: JsonOpt = False,
    coordinator: CoordinatorOpt = None,
    admin_key: AdminKeyOpt = None,
    ca_file: CaFileOpt = None,
) -> None:
    """Show one worker in full."""

    async def go() -> Any:
        async with make_client(coordinator, admin_key, ca_file=ca_file) as c:
            return await c.worker(worker_id)

    w = run_async(go, json_mode=json)
    if json:
        print_json(w)
        return
    caps = w.capabilities
    status = coloured(w.status.value)
    out.print(f"[bold]{w.name}[/bold] ({w.id})  {status}  tier {w.tier} ({w.tier_name})")
    seen = ago(w.last_heartbeat_at)
    out.print(f"  transport {w.transport.value}, version {w.version or '?'}, last heartbeat {seen}")
    gpus = ", ".join(f"{g.name} {g.memory_mb} MB" for g in caps.gpus) or "none"
    disk = f"{caps.disk_free_mb} MB disk"
    out.print(f"  {caps.cpu_cores} cores, {caps.memory_mb} MB RAM, {disk}, GPUs: {gpus}")
    out.print(f"  labels: {', '.join(f'{k}={v}' for k, v in w.labels.items()) or 'none'}")
    out.print(f"  assigned: {', '.join(w.assignments) or 'nothing'}")
    quarantine = ", QUARANTINED (no client traffic)" if w.quarantined else ""
    out.print(
        f"  reputation {w.reputation:.2f}: {w.verified} verified, "
        f"{w.disagreements} disagreements{quarantine}"
    )
    for s in w.services:
        health = " healthy" if s.healthy else ""
        out.print(f"    {s.name}: {s.state.value}{health}, {s.inflight} in flight")


@app.command()
def credits(
    by: Annotated[
        str, typer.Option("--by", help="Sum per worker, owner (the `owner` label) or client key.")
    ] = "worker",
    since: Annotated[
        str | None,
        typer.Option(
            "--since",
            help="Only what was earned and used since then: an ISO-8601 timestamp "
            "(2026-12-01T12:00:00Z; UTC without a zone) or a duration back from now "
            "(30m, 24h, 7d).",
            show_default=False,
        ),
    ] = None,
    json: JsonOpt = False,
    coordinator: CoordinatorOpt = None,
    admin_key: AdminKeyOpt = None,
    ca_file: CaFileOpt = None,
) -> None:
    """The credits ledger: what each worker (or owner) gave and each key used."""
    if by not in ("worker", "owner", "key"):
        raise typer.BadParameter("must be one of key, owner, worker", param_hint="--by")
    if since is not None:
        import time

        from rma.schemas.since import parse_since

        try:  # checked here for a quick answer; the coordinator reads it with its own clock
            parse_since(since, time.time())
        except ValueError as exc:
            fail(f"--since: {exc}", json_mode=json, code="invalid_since", exit_code=2)

    async def go() -> list[Any]:
        async with make_client(coordinator, admin_key, ca_file=ca_file) as c:
            return await c.credits(by, since)

    rows = run_async(go, json_mode=json)
    if json:
        print_json(rows)
        return
    table(
        None,
        [by.upper(), "NAME", "OWNER", "CREDITS", "ESCROW", "REQUESTS"],
        [
            [
                r.id or "-",
                r.name,
                r.owner or "-",
                f"{r.credits:.3f}",
                f"{r.escrow:.3f}",
                str(r.requests),
            ]
            for r in rows
        ],
    )
    if not rows:
        err.print("no credits yet: they are earned by serving requests")


#: The one-worker actions: command name -> its help.
WORKER_ACTIONS = {
    "drain": "Stop sending new requests to a worker (it keeps running).",
    "undrain": "Send requests to a drained worker again.",
    "remove": "Remove a worker from the pool; its credential stops working.",
    "trust": "Mark a worker trusted: requests sent with `x-rma-trusted: 1` go only to trusted "
    "workers.",
    "untrust": "Take a worker's trusted mark away.",
    "quarantine": "Keep client traffic away from a worker (it keeps heartbeating).",
    "unquarantine": "Let a quarantined worker take client traffic again; its verification "
    "record starts afresh.",
}


def _worker_action_command(action: str, help_text: str) -> None:
    """``rma admin <action> WORKER_ID``: one call of the client's method of that name."""

    def command(
        worker_id: WorkerIdArg,
        json: JsonOpt = False,
        coordinator: CoordinatorOpt = None,
        admin_key: AdminKeyOpt = None,
        ca_file: CaFileOpt = None,
    ) -> None:
        async def go() -> Any:
            async with make_client(coordinator, admin_key, ca_file=ca_file) as c:
                return await getattr(c, action)(worker_id)

        w = run_async(go, json_mode=json)
        if json:
            print_json(w)
        else:
            trust = ", trusted" if w.trusted else ""
            trust += ", quarantined" if w.quarantined else ""
            err.print(f"worker {w.name} ({w.id}) is now {coloured(w.status.value)}{trust}")

    command.__doc__ = help_text
    app.command(action)(command)


for _action, _help in WORKER_ACTIONS.items():
    _worker_action_command(_action, _help)


# --- tokens --------------------------------------------------------------------------------------


@tokens_app.command("create")
def tokens_create(
    ttl: Annotated[str, typer.Option(help="How long it is valid: 90s, 30m, 12h, 7d.")] = "30m",
    uses: Annotated[
        int | None, typer.Option(min=1, help="How many workers may join with it (default: 1).")
    ] = 1,
    unlimited: Annotated[
        bool, typer.Option("--unlimited", help="Any number of joins until it expires.")
    ] = False,
    label: Annotated[str, typer.Option(help="A note for yourself (who it is for).")] = "",
    json: JsonOpt = False,
    coordinator: CoordinatorOpt = None,
    admin_key: AdminKeyOpt = None,
    ca_file: CaFileOpt = None,
) -> None:
    """Create a join token; its secret is printed once."""
    seconds = parse_duration(ttl)

    async def go() -> Any:
        async with make_client(coordinator, admin_key, ca_file=ca_file) as c:
            return await c.create_token(seconds, None if unlimited else uses, label)

    t = run_async(go, json_mode=json)
    if json:
        print_json(t)
        return
    out.print(t.token)
    allowed = "unlimited" if t.uses is None else t.uses
    err.print(
        f"join token {t.id}: {allowed} use(s), expires {t.expires_at:%Y-%m-%d %H:%M} UTC. "
        "It is shown only now. On the worker:",
        highlight=False,
    )
    line = t.join_command or f"rma worker join --coordinator URL --token {t.token}"
    err.print(line, markup=False, highlight=False, soft_wrap=True)
    if " --insecure" in line:
        err.print(
            "warning: the coordinator serves plain HTTP: anyone on the network between it and a "
            "worker can impersonate it (serve TLS with --tls-cert/--tls-key)",
            highlight=False,
        )


@tokens_app.command("list")
def tokens_list(
    json: JsonOpt = False,
    coordinator: CoordinatorOpt = None,
    admin_key: AdminKeyOpt = None,
    ca_file: CaFileOpt = None,
) -> None:
    """List join tokens (never their secrets)."""

    async def go() -> list[Any]:
        async with make_client(coordinator, admin_key, ca_file=ca_file) as c:
            return await c.tokens()

    rows = run_async(go, json_mode=json)
    if json:
        print_json(rows)
        return
    table(
        None,
        ["ID", "LABEL", "STATUS", "USED", "EXPIRES"],
        [
            [
                t.id,
                t.label,
                coloured(t.status),
                f"{t.used}/{'∞' if t.uses is None else t.uses}",
                f"{t.expires_at:%Y-%m-%d %H:%M}",
            ]
            for t in rows
        ],
    )


@tokens_app.command("revoke")
def tokens_revoke(
    token_id: Annotated[str, typer.Argument(help="The token's id.")],
    json: JsonOpt = False,
    coordinator: CoordinatorOpt = None,
    admin_key: AdminKeyOpt = None,
    ca_file: CaFileOpt = None,
) -> None:
    """Revoke a join token: no more workers can join with it."""

    async def go() -> Any:
        async with make_client(coordinator, admin_key, ca_file=ca_file) as c:
            return await c.revoke_token(token_id)

    t = run_async(go, json_mode=json)
    print_json(t) if json else err.print(f"join token {t.id} revoked")


# --- keys ----------------------------------------------------------------------------------------


@keys_app.command("create")
def keys_create(
    name: Annotated[str, typer.Option(help="Who or what the key is for.")] = "",
    rpm: Annotated[
        int | None,
        typer.Option(min=0, help="Requests per minute; 0 unlimited (default: the coordinator's)."),
    ] = None,
    owner: Annotated[
        str,
        typer.Option(
            help="The donor the key belongs to: when requests queue, keys of owners whose "
            "workers earned more credits go first."
        ),
    ] = "",
    services: Annotated[
        str,
        typer.Option(
            help="Comma-separated services the key may use (default: every one except the data "
            "tier's, which `rma connect` reaches only with a key that names them)."
        ),
    ] = "",
    json: JsonOpt = False,
    coordinator: CoordinatorOpt = None,
    admin_key: AdminKeyOpt = None,
    ca_file: CaFileOpt = None,
) -> None:
    """Create a client API key; its secret is printed once."""
    allowed = [n.strip() for n in services.split(",") if n.strip()] or None

    async def go() -> Any:
        async with make_client(coordinator, admin_key, ca_file=ca_file) as c:
            return await c.create_key(name, rpm, owner, allowed)

    k = run_async(go, json_mode=json)
    if json:
        print_json(k)
        return
    out.print(k.key)
    owned = f", owner {k.owner}" if k.owner else ""
    owned += f", services {', '.join(k.services)}" if k.services else ""
    err.print(
        f"API key {k.id} ({k.rpm or 'unlimited'} requests/min{owned}). It is shown only now: "
        "export RMA_API_KEY=<key>, or pass it as the openai SDK's api_key."
    )


@keys_app.command("list")
def keys_list(
    json: JsonOpt = False,
    coordinator: CoordinatorOpt = None,
    admin_key: AdminKeyOpt = None,
    ca_file: CaFileOpt = None,
) -> None:
    """List API keys (never their secrets)."""

    async def go() -> list[Any]:
        async with make_client(coordinator, admin_key, ca_file=ca_file) as c:
            return await c.keys()

    rows = run_async(go, json_mode=json)
    if json:
        print_json(rows)
        return
    table(
        None,
        ["ID", "NAME", "OWNER", "RPM", "SERVICES", "STATUS", "LAST USED"],
        [
            [
                k.id,
                k.name,
                k.owner or "-",
                k.rpm or "∞",
                ",".join(k.services) if k.services else "all but data",
                coloured("revoked" if k.revoked else "active"),
                ago(k.last_used_at),
            ]
            for k in rows
        ],
    )


@keys_app.command("revoke")
def keys_revoke(
    key_id: Annotated[str, typer.Argument(help="The key's id.")],
    json: JsonOpt = False,
    coordinator: CoordinatorOpt = None,
    admin_key: AdminKeyOpt = None,
    ca_file: CaFileOpt = None,
) -> None:
    """Revoke a client API key at once."""

    async def go() -> Any:
        async with make_client(coordinator, admin_key, ca_file=ca_file) as c:
            return await c.revoke_key(key_id)

    k = run_async(go, json_mode=json)
    print_json(k) if json else err.print(f"API key {k.id} revoked")


# --- stats and events ----------------------------------------------------------------------------


@app.command()
def services(
    show_all: Annotated[
        bool,
        typer.Option(
            "--all",
            help="Also the data services that no worker holds or could run (and with no backup).",
        ),
    ] = False,
    json: JsonOpt = False,
    coordinator: CoordinatorOpt = None,
    admin_key: AdminKeyOpt = None,
    ca_file: CaFileOpt = None,
) -> None:
    """Each service: replicas wanted, assigned and healthy, requests in flight and queued; data
    services also their holder, open connections and last backup."""

    async def go() -> list[dict[str, Any]]:
        async with make_client(coordinator, admin_key, ca_file=ca_file) as c:
            return await c.services(show_all=show_all)

    rows = run_async(go, json_mode=json)
    if json:
        print_json(rows)
        return
    table(
        None,
        ["SERVICE", "WANTED", "ASSIGNED", "HEALTHY", "IN FLIGHT", "QUEUED", "LAST SCALING", "DATA"],
        [
            [
                x["name"],
                x["wanted"],
                x["assigned"],
                x["healthy"],
                x["inflight"],
                x["queued"],
                x.get("last_scaling_event") or "-",
                _data_cell(x),
            ]
            for x in rows
        ],
    )


def _data_cell(row: dict[str, Any]) -> str:
    """A data service's holder, open connections and last backup (``-`` for other services)."""
    if "holder" not in row:
        return "-"
    backup = row.get("last_backup")
    from datetime import datetime

    when = "no backup"
    if backup:
        when = f"backup {ago(datetime.fromisoformat(backup['at']))}, {_size(backup['size'])}"
    return f"on {row['holder'] or 'nobody'}, {row.get('connections', 0)} conn, {when}"


@app.command()
def backups(
    json: JsonOpt = False,
    coordinator: CoordinatorOpt = None,
    admin_key: AdminKeyOpt = None,
    ca_file: CaFileOpt = None,
) -> None:
    """The data services' backups in the coordinator's store, newest first per service."""

    async def go() -> list[Any]:
        async with make_client(coordinator, admin_key, ca_file=ca_file) as c:
            return await c.backups()

    rows = run_async(go, json_mode=json)
    if json:
        print_json(rows)
        return
    table(
        None,
        ["SERVICE", "TAKEN", "SIZE", "FROM WORKER", "SHA-256", "STORED IN"],
        [
            [b.service, ago(b.created_at), _size(b.size), b.worker, b.sha256[:16], b.location]
            for b in rows
        ],
    )


@app.command()
def restore(
    service: Annotated[str, typer.Argument(help="A data service with a backup: postgres, redis.")],
    at: Annotated[
        str | None,
        typer.Option(help="The backup's id (rma admin backups --json); default: the newest."),
    ] = None,
    json: JsonOpt = False,
    coordinator: CoordinatorOpt = None,
    admin_key: AdminKeyOpt = None,
    ca_file: CaFileOpt = None,
) -> None:
    """Replace a data service's copy on its holder with a backup (its connections are cut)."""

    async def go() -> dict[str, Any]:
        async with make_client(coordinator, admin_key, ca_file=ca_file) as c:
            return await c.restore(service, at)

    done = run_async(go, json_mode=json)
    if json:
        print_json(done)
        return
    b = done["backup"]
    err.print(
        f"{service} on worker {done['worker']} restores backup {b['id']} (taken "
        f"{b['created_at']}, {_size(int(b['size']))}) at its next heartbeat"
    )


def _size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB"):
        if size < 1024:
            return f"{size:.0f} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GB"


@catalog_app.command("reload")
def catalog_reload(
    json: JsonOpt = False,
    coordinator: CoordinatorOpt = None,
    admin_key: AdminKeyOpt = None,
    ca_file: CaFileOpt = None,
) -> None:
    """Read the coordinator's catalog file again and place services by it (like SIGHUP)."""

    async def go() -> dict[str, Any]:
        async with make_client(coordinator, admin_key, ca_file=ca_file) as c:
            return await c.reload_catalog()

    result = run_async(go, json_mode=json)
    if json:
        print_json(result)
        return
    err.print(f"catalog reloaded: {result['count']} services")


@app.command()
def stats(
    json: JsonOpt = False,
    coordinator: CoordinatorOpt = None,
    admin_key: AdminKeyOpt = None,
    ca_file: CaFileOpt = None,
) -> None:
    """Pool totals: workers by status and tier, services, usage."""

    async def go() -> dict[str, Any]:
        async with make_client(coordinator, admin_key, ca_file=ca_file) as c:
            return await c.stats()

    s = run_async(go, json_mode=json)
    if json:
        print_json(s)
        return
    w = s["workers"]
    out.print(
        f"[bold]workers[/bold] {w['total']}: "
        + ", ".join(f"{k} {v}" for k, v in w["by_status"].items() if v)
    )
    table(
        "services",
        ["SERVICE", "TIER", "WANTED", "ASSIGNED", "HEALTHY"],
        [
            [x["name"], x["tier"], x["wanted"] or "all", x["assigned"], x["healthy"]]
            for x in s["services"]
        ],
    )
    usage = s.get("usage")
    if usage:
        table(
            "usage (by service)",
            ["SERVICE", "REQUESTS", "ERRORS", "TOKENS", "P50 MS", "P95 MS"],
            [
                [u["service"], u["requests"], u["errors"], u["tokens"], u["p50_ms"], u["p95_ms"]]
                for u in usage.get("by_service", [])
            ],
        )
        table(
            "usage (by worker)",
            ["WORKER", "REQUESTS", "ERRORS", "TOKENS", "P50 MS", "P95 MS"],
            [
                [u["worker"], u["requests"], u["errors"], u["tokens"], u["p50_ms"], u["p95_ms"]]
                for u in usage.get("by_worker", [])
            ],
        )


@app.command()
def events(
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing events as they happen.")
    ] = False,
    limit: Annotated[int, typer.Option(min=1, max=10000, help="How many recent events.")] = 50,
    json: JsonOpt = False,
    coordinator: CoordinatorOpt = None,
    admin_key: AdminKeyOpt = None,
    ca_file: CaFileOpt = None,
) -> None:
    """Recent pool events; with --follow, one line (or JSON object) per event as it happens."""

    def show(e: Any) -> None:
        if json and follow:
            import json as _json

            print(_json.dumps(e.model_dump(mode="json")), flush=True)
        else:
            out.print(f"{e.ts:%H:%M:%S} [bold]{e.kind:<13}[/bold] {e.message}", soft_wrap=True)

    async def go() -> list[Any]:
        async with make_client(coordinator, admin_key, ca_file=ca_file) as c:
            if not follow:
                return await c.events(limit)
            async for e in c.follow_events():
                show(e)
            return []

    rows = run_async(go, json_mode=json)
    if not follow:
        if json:
            print_json(rows)
        else:
            for e in rows:
                show(e)


@app.command()
def top(
    coordinator: CoordinatorOpt = None,
    admin_key: AdminKeyOpt = None,
    ca_file: CaFileOpt = None,
    refresh: Annotated[
        float, typer.Option(min=0.2, help="Seconds between polls when events cannot stream.")
    ] = 2.0,
) -> None:
    """The live dashboard (Textual): workers, services, load, events."""
    from rma.client import RmaError
    from rma.tui import run_top

    try:
        run_top(lambda: make_client(coordinator, admin_key, ca_file=ca_file), refresh=refresh)
    except RmaError as exc:
        fail(exc.message, code=exc.code)
