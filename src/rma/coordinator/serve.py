"""Running the coordinator under uvicorn (``rma coordinator serve`` and ``rma up``)."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from pydantic import ValidationError

from rma.settings import CoordinatorSettings

if TYPE_CHECKING:
    import uvicorn


class ServeError(Exception):
    """A setting or the environment makes serving impossible; the message says which."""


def build_server(settings: CoordinatorSettings, log_level: str = "info") -> uvicorn.Server:
    import uvicorn

    from rma.catalog import CatalogError
    from rma.coordinator.app import create_app
    from rma.coordinator.pool import Pool

    if bool(settings.tls_cert) != bool(settings.tls_key):
        raise ServeError("--tls-cert and --tls-key go together")
    for path in (settings.tls_cert, settings.tls_key):
        if path is not None and not path.is_file():
            raise ServeError(f"no such file: {path}")
    try:
        pool = Pool(settings)
        created = pool.bootstrap()
    except CatalogError as exc:
        raise ServeError(str(exc)) from None
    except Exception as exc:  # database URL wrong, server down, permissions...
        raise ServeError(f"cannot open the database: {exc.__class__.__name__}: {exc}") from None
    key_file = settings.data_dir / "admin.key"
    if created:
        print(f"admin key created and written to {key_file} (mode 0600)", file=sys.stderr)
    else:
        print(f"admin key: {key_file}", file=sys.stderr)
    print(f"coordinator listening on {settings.url}", file=sys.stderr)
    app = create_app(settings, pool=pool)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=log_level,
        ssl_certfile=str(settings.tls_cert) if settings.tls_cert else None,
        ssl_keyfile=str(settings.tls_key) if settings.tls_key else None,
        proxy_headers=False,
        server_header=False,
        timeout_graceful_shutdown=10,
        ws_max_size=16 * 1024 * 1024,
    )
    return uvicorn.Server(config)


def serve_coordinator(settings: CoordinatorSettings, log_level: str = "info") -> None:
    try:
        server = build_server(settings, log_level)
    except ValidationError as exc:
        raise ServeError(str(exc.errors()[0]["msg"])) from None
    server.run()
