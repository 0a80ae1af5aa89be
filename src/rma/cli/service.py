"""``rma service list``, ``rma service run NAME`` and ``rma service build NAME``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from rma.cli.options import JsonOpt
from rma.cli.output import fail, print_json, table

app = typer.Typer(help="The service catalog and the built-in services.", no_args_is_help=True)

CatalogOpt = Annotated[
    Path | None,
    typer.Option("--catalog", envvar="RMA_CATALOG", help="Operator's catalog TOML to merge in."),
]


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="service")


@app.command("list")
def list_services(catalog: CatalogOpt = None, json: JsonOpt = False) -> None:
    """The catalog: each service's tier, kind, models, what it needs and, for data services,
    the connection string that `rma connect` prints."""
    from rma.catalog import CatalogError, load_catalog

    try:
        cat = load_catalog(catalog)
    except CatalogError as exc:
        fail(str(exc), json_mode=json)
    if json:
        print_json([spec.model_dump(mode="json") for spec in cat.values()])
        return
    table(
        None,
        ["SERVICE", "TIER", "KIND", "MODELS", "RAM MB", "GPU", "RUNS AS", "CONNECT", "DESCRIPTION"],
        [
            [
                s.name,
                f"{s.tier} {s.tier_name}",
                s.kind,
                ", ".join(s.models) or "-",
                s.resources.memory_mb,
                f"{s.resources.vram_mb} MB" if s.gpu else "-",
                " / ".join(
                    x for x in ("process" if s.command else "", "docker" if s.image else "") if x
                ),
                _connect_hint(s.connect_url),
                s.description,
            ]
            for s in cat.values()
        ],
    )


@app.command("run")
def run(
    name: Annotated[
        str, typer.Argument(help="A built-in service: llm, embeddings, ocr, ner, doc, rag, notes.")
    ],
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port to listen on.")] = 8000,
) -> None:
    """Run a built-in service in the foreground (also each service container's entry point)."""
    from rma.services import BUILTIN, run_service

    if name not in BUILTIN:
        fail(
            f"no built-in service {name!r}; choose one of: {', '.join(sorted(BUILTIN))}",
            exit_code=2,
        )
    try:
        run_service(name, host, port)
    except (ImportError, ValueError, FileNotFoundError) as exc:
        fail(f"{name}: {exc}")


@app.command("build")
def build(
    name: Annotated[
        str, typer.Argument(help="A built-in service: llm, embeddings, ocr, ner, doc, rag, notes.")
    ],
    tag: Annotated[
        str | None, typer.Option(help="Image tag; default the catalog's rma/NAME:latest.")
    ] = None,
    json: JsonOpt = False,
) -> None:
    """Build a built-in service's image on this machine's Docker engine (the agent runs it)."""
    from rma.services import BUILTIN

    if name not in BUILTIN:
        fail(
            f"no built-in service {name!r}; choose one of: {', '.join(sorted(BUILTIN))}",
            exit_code=2,
            json_mode=json,
        )
    try:
        import docker
        from docker.errors import DockerException
    except ImportError:
        from rma import install_hint

        fail(f"the docker SDK is not installed ({install_hint('docker')})", json_mode=json)
    from rma.images import BuildFailed, build_image

    try:
        client = docker.from_env(timeout=30)
        client.ping()
    except (DockerException, OSError) as exc:
        fail(f"no Docker engine answers: {exc}", json_mode=json)
    try:
        built = build_image(client, name, tag=tag, quiet=json)
    except BuildFailed as exc:
        fail(f"cannot build {tag or f'rma/{name}:latest'}: {exc}", json_mode=json)
    except (DockerException, OSError) as exc:
        fail(f"cannot build {tag or f'rma/{name}:latest'}: {exc}", json_mode=json)
    finally:
        client.close()
    if json:
        print_json({"service": name, "image": built})
    else:
        typer.echo(f"built {built}")


def _connect_hint(template: str | None) -> str:
    """A ``connect_url`` as ``rma connect`` will print it (PORT: the one it listens on)."""
    if not template:
        return "-"
    return template.replace("{host}", "127.0.0.1").replace("{port}", "PORT")
