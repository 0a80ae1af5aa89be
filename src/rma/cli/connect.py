"""``rma connect SERVICE [--port N]``: a local port that reaches a data service of the pool."""

from __future__ import annotations

from typing import Annotated

import typer

from rma.cli.options import ApiKeyOpt, CaFileOpt, CoordinatorOpt, JsonOpt


def register(app: typer.Typer) -> None:
    """Attach ``rma connect`` to the root app."""
    app.command("connect")(connect)


def connect(
    service: Annotated[
        str, typer.Argument(help="A data service of the catalog (kind tcp): postgres, redis.")
    ],
    port: Annotated[
        int,
        typer.Option("--port", "-p", min=0, max=65535, help="Local port to listen on (0: any)."),
    ] = 0,
    host: Annotated[
        str, typer.Option(help="Local address to listen on (loopback unless you mean it).")
    ] = "127.0.0.1",
    json: JsonOpt = False,
    coordinator: CoordinatorOpt = None,
    api_key: ApiKeyOpt = None,
    ca_file: CaFileOpt = None,
) -> None:
    """Forward a local TCP port to a data service through the coordinator, until interrupted.

    Prints the connection string on stdout (one JSON object with --json), e.g.
    postgresql://postgres:rma@127.0.0.1:PORT/postgres.
    """
    from rma.cli.options import make_client
    from rma.cli.output import err, run_async

    async def go() -> None:
        from json import dumps

        from rma.client import RmaError
        from rma.connect import Forwarder

        async with make_client(coordinator, api_key=api_key, ca_file=ca_file) as client:
            base, key, verify = client.base_url, client.api_key, client.verify
        if not key:
            raise RmaError(
                "missing_api_key",
                "rma connect needs a client API key: --api-key or RMA_API_KEY "
                "(rma admin keys create)",
            )
        if host not in ("127.0.0.1", "localhost", "::1"):
            err.print(
                f"warning: listening on {host}: anyone who reaches that address reaches "
                f"{service} with this API key's rights"
            )
        fw = Forwarder(base, key, service, host=host, port=port, verify=verify)
        info = await fw.check()
        bound = await fw.start()
        try:
            url = _connection_string(info.get("connect_url"), host, bound)
            if json:  # one line: the command keeps running, a reader takes it at once
                doc = {"service": service, "host": host, "port": bound}
                doc |= {"worker": info.get("worker"), "url": url}
                print(dumps(doc), flush=True)
            else:
                print(url or f"{host}:{bound}", flush=True)
            err.print(
                f"forwarding {host}:{bound} -> {service} on worker {info.get('worker')} "
                "(Ctrl-C stops)"
            )
            await fw.serve_forever()
        finally:
            await fw.aclose()

    run_async(go, json_mode=json)


def _connection_string(template: object, host: str, port: int) -> str | None:
    if not isinstance(template, str) or not template:
        return None
    return template.replace("{host}", host).replace("{port}", str(port))
