"""Running the coordinator under uvicorn (``rma coordinator serve`` and ``rma up``)."""

from __future__ import annotations

import socket
import sys
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from rma.settings import CoordinatorSettings

if TYPE_CHECKING:
    import uvicorn

LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")


class ServeError(Exception):
    """A setting or the environment makes serving impossible; the message says which."""


def one_line(exc: BaseException) -> str:
    """A short, single-line account of ``exc`` (SQLAlchemy's and drivers' messages are long)."""
    inner = getattr(exc, "orig", None) or exc  # SQLAlchemy wraps the driver's exception
    lines = [ln.strip() for ln in str(inner).splitlines() if ln.strip()]
    lines = [ln for ln in lines if not ln.startswith("(Background on this error")]
    text = lines[0] if lines else type(inner).__name__
    return f"{type(inner).__name__}: {text}"


def settings_error(exc: ValidationError) -> ServeError:
    first = exc.errors()[0]
    name = ".".join(str(p) for p in first["loc"])
    if not name:  # a rule over several settings (its message names them)
        return ServeError(f"invalid settings: {first['msg'].removeprefix('Value error, ')}")
    return ServeError(f"invalid setting {name} (RMA_{name.upper()}): {first['msg']}")


def bind_socket(host: str, port: int) -> socket.socket:
    """The listening socket, bound now: a busy port or a bad host is one clear error."""
    try:
        infos = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        raise ServeError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    family, kind, proto, _, addr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
    except OSError as exc:
        sock.close()
        raise ServeError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


def build_server(settings: CoordinatorSettings, log_level: str = "info") -> uvicorn.Server:
    """Open the database (migrating it), make the admin key on first start, build the server."""
    import uvicorn

    from rma.catalog import CatalogError
    from rma.coordinator.app import create_app
    from rma.coordinator.credentials import SigningKeyError
    from rma.coordinator.pool import Pool

    if log_level not in LOG_LEVELS:
        raise ServeError(f"--log-level must be one of {', '.join(LOG_LEVELS)}")
    if bool(settings.tls_cert) != bool(settings.tls_key):
        raise ServeError("--tls-cert and --tls-key go together")
    for path in (settings.tls_cert, settings.tls_key, settings.catalog):
        if path is not None and not path.is_file():
            raise ServeError(f"no such file: {path}")
    if settings.tls_cert and settings.tls_key:
        import ssl

        try:  # a bad pair is one clear error, before anything is made
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(
                settings.tls_cert, settings.tls_key
            )
        except (OSError, ssl.SSLError) as exc:
            raise ServeError(f"cannot use --tls-cert/--tls-key: {one_line(exc)}") from None
    try:
        pool = Pool(settings)
        created = pool.bootstrap()
    except (CatalogError, SigningKeyError) as exc:
        raise ServeError(str(exc)) from None
    except Exception as exc:  # database URL wrong, server down, permissions...
        raise ServeError(f"cannot open the database: {one_line(exc)}") from None
    key_file = settings.data_dir / "admin.key"
    if created:
        print(f"admin key created and written to {key_file} (mode 0600)", file=sys.stderr)
    elif key_file.is_file():
        print(f"admin key: {key_file}", file=sys.stderr)
    else:
        print(
            f"warning: the admin key was made earlier but {key_file} is gone; admin commands "
            "need the key (--admin-key / RMA_ADMIN_KEY)",
            file=sys.stderr,
        )
    app = create_app(settings, pool=pool)
    config = server_config(settings, app, log_level)
    return uvicorn.Server(config)


def server_config(settings: CoordinatorSettings, app: Any, log_level: str) -> uvicorn.Config:
    """uvicorn's settings for the coordinator (``rma coordinator serve`` and ``rma up``)."""
    import uvicorn

    from rma.coordinator.connections import (
        ConnectionGuard,
        default_max_connections,
        protocol_class,
        raise_nofile_limit,
    )
    from rma.coordinator.gcpause import FREEZE_FLAG
    from rma.tunnel.frames import MAX_FRAME

    nofile = raise_nofile_limit()
    guard = ConnectionGuard(
        max_connections=settings.max_connections or default_max_connections(nofile),
        max_per_address=settings.max_connections_per_address,
        header_timeout=settings.header_timeout,
        max_header_bytes=settings.max_header_bytes,
    )
    http: Any
    try:
        http = protocol_class(guard)
    except ImportError:  # no httptools: uvicorn's h11 protocol, without the caps
        http = "h11"
        print(
            "warning: httptools is not installed: no connection caps or header deadline "
            "(pip install httptools)",
            file=sys.stderr,
        )
    else:
        if hasattr(app, "state"):
            app.state.connections = guard  # /readyz says when it is saturated
    if hasattr(app, "state"):
        setattr(app.state, FREEZE_FLAG, True)  # a serving process: short GC pauses
    return uvicorn.Config(
        app,
        http=http,
        h11_max_incomplete_event_size=settings.max_header_bytes,
        timeout_keep_alive=max(1, round(settings.keepalive_timeout)),
        host=settings.host,
        port=settings.port,
        log_level=log_level,
        ssl_certfile=str(settings.tls_cert) if settings.tls_cert else None,
        ssl_keyfile=str(settings.tls_key) if settings.tls_key else None,
        proxy_headers=settings.forwarded_allow_ips is not None,
        forwarded_allow_ips=settings.forwarded_allow_ips,
        server_header=False,
        timeout_graceful_shutdown=10,
        ws_max_size=MAX_FRAME,  # the tunnel protocol's largest frame: nothing bigger is parsed
    )


def reload_on_sighup(pool: Any) -> None:
    """``kill -HUP``: reload the catalog (as ``rma admin catalog reload``), in a thread of its
    own so the handler never blocks the event loop or takes the registry's lock itself."""
    import signal
    import threading

    from rma.coordinator.errors import APIError

    def reload() -> None:
        try:
            catalog = pool.reload_catalog()
        except APIError as exc:
            print(f"error: {exc.message}", file=sys.stderr)
        else:
            print(f"catalog reloaded: {len(catalog)} services", file=sys.stderr)

    def handler(signum: int, frame: object) -> None:
        threading.Thread(target=reload, name="rma-catalog-reload", daemon=True).start()

    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, handler)


def serve_coordinator(settings: CoordinatorSettings, log_level: str = "info") -> None:
    """Bind, bootstrap and serve until interrupted.  Raises :class:`ServeError` on bad setup."""
    sock = bind_socket(settings.host, settings.port)
    try:
        port = int(sock.getsockname()[1])
        if port != settings.port:  # --port 0: the system chose one
            settings = settings.model_copy(update={"port": port})
        try:
            server = build_server(settings, log_level)
        except ValidationError as exc:
            raise settings_error(exc) from None
        app: Any = server.config.app  # the FastAPI app build_server made
        reload_on_sighup(app.state.pool)
        print(f"coordinator listening on {settings.url}", file=sys.stderr)
        server.run(sockets=[sock])
    finally:
        sock.close()
