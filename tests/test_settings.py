"""Settings: precedence (flag > RMA_* > config file > default), derived values, and the docs that
must list every coordinator setting (a new field without a line in docs/operations.md fails)."""

from __future__ import annotations

import re
import stat
from pathlib import Path

import pytest
from pydantic import ValidationError

from rma.settings import ClientSettings, CoordinatorSettings

DOCS = Path(__file__).resolve().parents[1] / "docs"


def test_defaults(tmp_path: Path) -> None:
    s = CoordinatorSettings()
    assert (s.host, s.port) == ("127.0.0.1", 8420)  # loopback unless asked
    assert (s.heartbeat_interval, s.offline_after, s.remove_after) == (30, 120, 600)
    assert s.data_dir == tmp_path / "data"  # RMA_DATA_DIR from the isolation fixture
    assert s.db_url == f"sqlite:///{tmp_path / 'data' / 'rma.db'}"
    assert s.grace == s.offline_after
    assert s.url == "http://127.0.0.1:8420"


def test_precedence_flag_env_config_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = tmp_path / "rma.toml"
    cfg.write_text("[coordinator]\noffline_after = 50\nremove_after = 500\nport = 9000\n")
    s = CoordinatorSettings.load(cfg)
    assert (s.offline_after, s.remove_after, s.port) == (50, 500, 9000)
    monkeypatch.setenv("RMA_REMOVE_AFTER", "400")
    monkeypatch.setenv("RMA_PORT", "9001")
    s = CoordinatorSettings.load(cfg, port=9002)
    assert (s.offline_after, s.remove_after, s.port) == (50, 400, 9002)
    assert CoordinatorSettings.load(cfg, port=None).port == 9001  # None: flag not given


def test_rma_config_env_names_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text("[coordinator]\nheartbeat_interval = 7\n[client]\ntimeout = 3\n")
    monkeypatch.setenv("RMA_CONFIG", str(cfg))
    assert CoordinatorSettings.load().heartbeat_interval == 7
    assert ClientSettings.load().timeout == 3


@pytest.mark.parametrize(
    "bad",
    [
        {"port": 70000},
        {"offline_after": 0},
        {"suspect_fraction": 1.5},
        {"restart_grace": -1},
        {"service_min_cores": 0},
        {"max_attempts": 0},
    ],
)
def test_invalid_values_are_refused(bad: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        CoordinatorSettings(**bad)


def test_derived_urls_and_grace() -> None:
    assert CoordinatorSettings(host="0.0.0.0", port=1).url == "http://127.0.0.1:1"
    tls = CoordinatorSettings(tls_cert=Path("c"), tls_key=Path("k"))
    assert tls.url.startswith("https://")
    assert CoordinatorSettings(public_url="https://pool.example/").url == "https://pool.example"
    assert CoordinatorSettings(restart_grace=5).grace == 5
    assert CoordinatorSettings(database_url="postgresql://x/y").db_url == "postgresql://x/y"


def test_client_admin_key_from_the_data_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from rma.coordinator.credentials import write_secret_file

    key_file = tmp_path / "data" / "admin.key"
    write_secret_file(key_file, "rma_admin_from_file")
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert ClientSettings.load().resolved_admin_key() == "rma_admin_from_file"
    monkeypatch.setenv("RMA_ADMIN_KEY", "rma_admin_from_env")
    assert ClientSettings.load().resolved_admin_key() == "rma_admin_from_env"
    assert ClientSettings.load(admin_key="rma_admin_flag").resolved_admin_key() == "rma_admin_flag"


def test_every_coordinator_setting_is_documented() -> None:
    """datasette-style: docs/operations.md has a row per field, with its RMA_ name and default."""
    text = (DOCS / "operations.md").read_text()
    rows = {
        m.group(1): m.group(0)
        for m in re.finditer(r"^\|\s*`(RMA_[A-Z0-9_]+)`.*$", text, flags=re.MULTILINE)
    }
    missing = []
    for name, field in CoordinatorSettings.model_fields.items():
        env = f"RMA_{name.upper()}"
        if env not in rows:
            missing.append(env)
            continue
        default = field.default
        if isinstance(default, bool):
            assert str(default).lower() in rows[env].lower(), (env, rows[env])
        elif isinstance(default, int | float):
            shown = str(default) if isinstance(default, int) else f"{default:g}"
            assert shown in rows[env], f"{env}: default {shown} not in {rows[env]!r}"
    assert not missing, f"add these settings to docs/operations.md: {missing}"
    extra = set(rows) - {f"RMA_{n.upper()}" for n in CoordinatorSettings.model_fields}
    extra -= {"RMA_CONFIG"}
    assert not extra, f"docs/operations.md lists settings that do not exist: {sorted(extra)}"


def test_security_doc_covers_the_essentials() -> None:
    text = (DOCS / "security.md").read_text()
    for needle in (
        "HS256",
        "0600",
        "Retry-After",
        "--tls-cert",
        "--ca-file",
        "413",
        "caddy",
        "nginx",
    ):
        assert needle.lower() in text.lower(), needle
