"""``rma coordinator serve`` refuses bad setups with one ``error:`` line, and changes nothing."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rma.cli.main import app

from .conftest import assert_one_error

UNREACHABLE_PG = "postgresql+psycopg://nobody@127.0.0.1:1/x"


def _busy_port() -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s


@pytest.mark.parametrize(
    ("args", "env", "expect"),
    [
        (["--database-url", f"{UNREACHABLE_PG}"], {}, "cannot open the database"),
        (["--database-url", "nosuchdb://x"], {}, "cannot open the database"),
        (["--database-url", "not a url"], {}, "cannot open the database"),
        (["--tls-cert", "/etc/hostname"], {}, "--tls-cert and --tls-key go together"),
        (["--tls-cert", "/etc/hostname", "--tls-key", "/etc/hostname"], {}, "cannot use --tls"),
        (["--catalog", "/no/such/catalog.toml"], {}, "no such file"),
        (["--config", "/no/such/config.toml"], {}, "no such config file"),
        ([], {"RMA_PORT": "eighty"}, "invalid setting port (RMA_PORT)"),
        ([], {"RMA_OFFLINE_AFTER": "-5"}, "invalid setting offline_after"),
        (["--host", "999.1.1.1"], {}, "cannot listen on 999.1.1.1"),
        (["--log-level", "loud"], {}, "--log-level must be one of"),
    ],
)  # fmt: skip
def test_bad_setups_fail_with_one_error_line(
    tmp_path: Path, args: list[str], env: dict[str, str], expect: str
) -> None:
    data = tmp_path / "data"
    port = [] if "RMA_PORT" in env else ["--port", "0"]  # a flag would beat the environment
    result = CliRunner().invoke(
        app, ["coordinator", "serve", "--data-dir", str(data), *port, *args], env=env
    )
    line = assert_one_error(result)
    assert expect in line, line
    assert not (data / "admin.key").exists()  # a refused start makes nothing


def test_busy_port_is_one_error_line(tmp_path: Path) -> None:
    with _busy_port() as s:
        port = s.getsockname()[1]
        result = CliRunner().invoke(
            app, ["coordinator", "serve", "--data-dir", str(tmp_path), "--port", str(port)]
        )
    line = assert_one_error(result)
    assert f"cannot listen on 127.0.0.1:{port}" in line


def test_invalid_catalog_file(tmp_path: Path) -> None:
    bad = tmp_path / "catalog.toml"
    bad.write_text("[services.x]\ntier = 9\n")
    result = CliRunner().invoke(
        app, ["coordinator", "serve", "--data-dir", str(tmp_path / "d"), "--port", "0",
              "--catalog", str(bad)],
    )  # fmt: skip
    line = assert_one_error(result)
    assert "service 'x'" in line
    assert "tier" in line


def test_config_file_section_is_read(tmp_path: Path) -> None:
    """``--config FILE`` reads the ``[coordinator]`` section (here: a port that is taken)."""
    with _busy_port() as s:
        port = s.getsockname()[1]
        cfg = tmp_path / "rma.toml"
        cfg.write_text(f"[coordinator]\nport = {port}\n")
        result = CliRunner().invoke(
            app, ["coordinator", "serve", "--data-dir", str(tmp_path), "--config", str(cfg)]
        )
    assert f"cannot listen on 127.0.0.1:{port}" in assert_one_error(result)
