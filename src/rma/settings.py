"""Settings, one class per role.

Precedence everywhere: command-line flag > ``RMA_*`` environment variable > TOML config file >
default.  Flags are passed as constructor keyword arguments; ``None`` means "not given".
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from platformdirs import user_config_dir, user_data_dir
from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from rma import install_hint

DEFAULT_PORT = 8420
DEFAULT_COORDINATOR_URL = f"http://127.0.0.1:{DEFAULT_PORT}"


def default_data_dir() -> Path:
    """The XDG data dir (``~/.local/share/rma``), or ``RMA_DATA_DIR``."""
    env = os.environ.get("RMA_DATA_DIR")
    return Path(env).expanduser() if env else Path(user_data_dir("rma", appauthor=False))


def default_config_file() -> Path:
    """The client config file (``~/.config/rma/config.toml``), or ``RMA_CONFIG``."""
    env = os.environ.get("RMA_CONFIG")
    return (
        Path(env).expanduser()
        if env
        else Path(user_config_dir("rma", appauthor=False)) / "config.toml"
    )


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)
_UNIT_MB = {"": 1.0, "k": 1 / 1024, "m": 1.0, "g": 1024.0, "t": 1024.0 * 1024}


def parse_size(value: str | int | float) -> int:
    """``4G``, ``512M``, ``1.5g``, ``2048`` (megabytes) -> megabytes.

    Raises :class:`ValueError` saying what a size looks like.
    """
    if isinstance(value, bool):
        raise ValueError("must be a size such as 4G or 512M")
    if isinstance(value, int | float):
        mb = float(value)
    else:
        m = _SIZE.match(value)
        if m is None:
            raise ValueError(f"{value!r} is not a size such as 4G, 512M or 2048 (megabytes)")
        mb = float(m.group(1)) * _UNIT_MB[m.group(2).lower()]
    if mb < 1:
        raise ValueError(f"{value!r} is less than one megabyte")
    return int(mb)


class _Base(BaseSettings):
    """Shared behaviour: ``RMA_`` prefix, TOML config file, flags given as ``None`` are ignored."""

    model_config = SettingsConfigDict(env_prefix="RMA_", extra="ignore", populate_by_name=True)
    toml_section: ClassVar[str | None] = None
    config_path: ClassVar[Path | None] = None

    def __init__(self, _config_file: Path | None = None, **values: Any) -> None:
        cleaned = {k: v for k, v in values.items() if v is not None}
        type(self).config_path = _config_file
        super().__init__(**cleaned)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        path = cls.config_path
        if path is not None and path.is_file():
            sources.append(_SectionToml(settings_cls, path, cls.toml_section))
        return tuple(sources)


class _SectionToml(TomlConfigSettingsSource):
    """A TOML source that reads one ``[section]`` (or the top level when none is set)."""

    def __init__(self, settings_cls: type[BaseSettings], path: Path, section: str | None) -> None:
        super().__init__(settings_cls, toml_file=path)
        if section is not None:
            data = self.toml_data.get(section, {})
            self.toml_data = data if isinstance(data, dict) else {}
            self.init_kwargs = self.toml_data


class ClientSettings(_Base):
    """What every client command (CLI, dashboard) needs to reach the coordinator."""

    toml_section: ClassVar[str | None] = "client"

    coordinator_url: str = Field(
        DEFAULT_COORDINATOR_URL, description="Base URL of the coordinator (RMA_COORDINATOR_URL)."
    )
    admin_key: str | None = Field(
        None, description="Admin key; when unset, <data-dir>/admin.key on this machine is read."
    )
    api_key: str | None = Field(None, description="Client API key for the gateway (/v1/*).")
    ca_file: Path | None = Field(
        None, description="CA bundle to verify the coordinator's TLS certificate."
    )
    insecure: bool = Field(False, description="Skip TLS verification (testing only).")
    timeout: float = Field(30.0, description="Seconds to wait for the coordinator's answer.")
    data_dir: Path = Field(
        default_factory=default_data_dir, description="Where admin.key is looked for."
    )

    @classmethod
    def load(cls, config_file: Path | None = None, **flags: Any) -> ClientSettings:
        return cls(_config_file=config_file or default_config_file(), **flags)

    def resolved_admin_key(self) -> str | None:
        """The admin key from flag/env/config, else from ``<data-dir>/admin.key``."""
        if self.admin_key:
            return self.admin_key
        path = self.data_dir / "admin.key"
        try:
            return path.read_text().strip() or None
        except OSError:
            return None


class CoordinatorSettings(_Base):
    """The coordinator: control plane, gateway, sweeper."""

    #: a ValidationError's text never repeats what was given (it may hold a secret)
    model_config = SettingsConfigDict(hide_input_in_errors=True)
    toml_section: ClassVar[str | None] = "coordinator"

    host: str = Field("127.0.0.1", description="Address to listen on; loopback unless asked.")
    port: int = Field(DEFAULT_PORT, ge=0, le=65535, description="TCP port to listen on.")
    data_dir: Path = Field(
        default_factory=default_data_dir, description="Where rma.db and admin.key live."
    )
    database_url: str | None = Field(
        None,
        description="SQLAlchemy URL; default sqlite:///<data-dir>/rma.db. PostgreSQL: postgresql+psycopg://...",
    )
    catalog: Path | None = Field(
        None, description="Operator's TOML file extending the built-in catalog."
    )
    tls_cert: Path | None = Field(None, description="PEM certificate: serve HTTPS directly.")
    tls_key: Path | None = Field(None, description="PEM private key for --tls-cert.")
    public_url: str | None = Field(
        None, description="URL workers and services use to reach the coordinator."
    )
    forwarded_allow_ips: str | None = Field(
        None,
        description="Behind a reverse proxy: comma-separated proxy addresses whose "
        "X-Forwarded-For/-Proto are trusted (the client address for rate limits); unset: none.",
    )

    heartbeat_interval: float = Field(30.0, gt=0, description="Seconds between worker heartbeats.")
    offline_after: float = Field(
        120.0, gt=0, description="Seconds of silence before a worker is offline."
    )
    remove_after: float = Field(
        600.0, gt=0, description="Seconds of silence before a worker is removed."
    )
    restart_grace: float | None = Field(
        None,
        ge=0,
        description="Seconds after start before anyone is judged; default offline_after.",
    )
    sweep_interval: float = Field(5.0, gt=0, description="Seconds between liveness sweeps.")
    coordinator_name: str | None = Field(
        None,
        max_length=59,
        description="This coordinator's name among several on one PostgreSQL database (in "
        "/readyz and the leader election); default: the public URL, else host:port.",
    )
    internal_url: str | None = Field(
        None,
        description="Several coordinators (PostgreSQL): the URL the other coordinators reach "
        "this one at, to relay requests to the worker tunnels it holds; default "
        "http(s)://<host>:<port> (127.0.0.1 when listening on every address).",
    )
    leader_retry_interval: float = Field(
        2.0,
        gt=0,
        description="Several coordinators (PostgreSQL): seconds between a follower's attempts "
        "to take the leadership, and between the leader's checks that it still holds it.",
    )
    event_retention: float = Field(
        2_592_000, gt=0, description="Seconds events are kept in the database (30 days)."
    )
    usage_retention: float = Field(
        604_800, gt=0, description="Seconds usage records (one per request) are kept (7 days)."
    )
    suspect_fraction: float = Field(
        0.5,
        gt=0,
        le=1,
        description="If more than this fraction of workers go silent at once, remove nobody.",
    )
    signing_key_file: Path | None = Field(
        None,
        description="File holding the worker-credential signing key (0600; an operator can "
        "mount one). Default with SQLite: signing.key beside the database; with a shared "
        "database and no file: kept in the database.",
    )
    credential_ttl: float = Field(
        900.0, gt=0, description="Lifetime in seconds of a worker credential (JWT)."
    )
    reconcile_interval: float = Field(
        30.0,
        gt=0,
        description="Scheduler: seconds between periodic reconciliation passes (it also runs on "
        "every join, leave, offline, removal, drain and catalog reload).",
    )
    scale_interval: float = Field(
        5.0, gt=0, description="Scheduler: seconds between looks at demand (scaling)."
    )
    scale_up_utilization: float = Field(
        0.8,
        gt=0,
        description="Scheduler: scale a service up while (in flight + queued) / (healthy "
        "replicas x capacity) stays above this...",
    )
    scale_up_window: float = Field(30.0, ge=0, description="Scheduler: ...for this many seconds.")
    scale_down_utilization: float = Field(
        0.3,
        ge=0,
        description="Scheduler: scale a service down while its utilization stays below this...",
    )
    scale_down_after: float = Field(
        300.0, ge=0, description="Scheduler: ...for this many seconds (the quiet period)."
    )
    scale_cooldown: float = Field(
        60.0, ge=0, description="Scheduler: seconds between two scaling steps of one service."
    )
    drain_timeout: float = Field(
        300.0,
        ge=0,
        description="Scheduler: seconds a draining worker keeps its services while their "
        "replacements elsewhere become healthy; then it lets go anyway.",
    )
    handover_backup_timeout: float = Field(
        120.0,
        ge=0,
        description="Data tier: seconds an operator's drain waits for the holder's fresh backup "
        "before placing its data services elsewhere from the newest one there is (0: no wait).",
    )

    gpu_verify_window: float = Field(
        1800.0,
        gt=0,
        description="Seconds a GPU-tier worker has to get one of its GPU services healthy; "
        "past it they are unassigned and the worker is re-tiered by its other hardware.",
    )
    gpu_min_vram_mb: int = Field(
        8192, ge=0, description="Tier 1 (gpu): a GPU with at least this much VRAM."
    )
    service_min_memory_mb: int = Field(
        4096, ge=0, description="Tier 2 (service): at least this much RAM..."
    )
    service_min_cores: int = Field(2, ge=1, description="...and at least this many CPU cores.")
    data_min_memory_mb: int = Field(
        2048, ge=0, description="Tier 3 (data): at least this much RAM."
    )

    max_body_bytes: int = Field(
        1 << 20, gt=0, description="Largest request body on control-plane routes."
    )
    max_gateway_body_bytes: int = Field(
        32 << 20, gt=0, description="Largest request body through the gateway."
    )
    auth_fail_limit: int = Field(
        10,
        gt=0,
        description="Failed authentications per role (admin, client, worker, join token) and "
        "client address per window, and per join token; past it bad credentials get 429 (a "
        "valid one never does).",
    )
    auth_fail_address_limit: int = Field(
        50, gt=0, description="Failed authentications per client address per window, all roles."
    )
    auth_fail_window: float = Field(
        60.0, gt=0, description="Window in seconds for auth_fail_limit."
    )
    max_connections: int | None = Field(
        None,
        ge=1,
        description="Open client connections in all; past it new ones get a fast 503 and "
        "/readyz answers 503. Default: the open-file limit (raised to its hard limit at start) "
        "less a quarter.",
    )
    max_connections_per_address: int = Field(
        256,
        ge=0,
        description="Open connections from one client address (behind a reverse proxy: the "
        "proxy's); past it new ones get a fast 503. 0: no limit.",
    )
    header_timeout: float = Field(
        10.0,
        gt=0,
        description="Seconds a client has to send a request's line and headers (slowloris); "
        "past it: 408 and the connection is closed.",
    )
    keepalive_timeout: float = Field(
        5.0, gt=0, description="Seconds an idle keep-alive connection is kept open."
    )
    max_header_bytes: int = Field(
        65536, ge=1024, description="Largest request line and headers in bytes; past it: 431."
    )
    anonymous_clients: bool = Field(
        False, description="Serve /v1/* and /api/services/* without an API key."
    )
    trust_worker_endpoints: bool = Field(
        False,
        description="Direct transport: use service endpoints on any host; by default an endpoint "
        "must be on the IP address the worker connects from (no SSRF).",
    )

    service_key_data: Annotated[list[str], NoDecode] = Field(
        ["postgres"],
        description="Data tier: the data services a worker's service key may connect to "
        "(comma-separated; empty: none), so rag and notes keep their stores there.",
    )
    backup_keep: int = Field(
        5, ge=1, description="Data tier: backups kept per service in the coordinator's store."
    )
    max_backup_bytes: int = Field(
        1024**3,
        ge=1024,
        description="Data tier: largest backup a worker may upload (then 413).",
    )
    backup_s3_url: str | None = Field(
        None,
        description="Data tier: endpoint of an S3-compatible object store for the backups "
        "(https://s3.eu-west-1.amazonaws.com, http://minio:9000); unset: <data-dir>/backups. "
        "Needed with several coordinators.",
    )
    backup_s3_bucket: str | None = Field(
        None, description="Data tier: the S3 bucket the backups go to (it must exist)."
    )
    backup_s3_prefix: str = Field(
        "rma/backups/",
        max_length=200,
        description="Data tier: key prefix of the backups in the S3 bucket.",
    )
    backup_s3_region: str = Field(
        "us-east-1", description="Data tier: the S3 region (signed into every request)."
    )
    backup_s3_access_key: str | None = Field(
        None, description="Data tier: the S3 access key id (RMA_BACKUP_S3_ACCESS_KEY)."
    )
    backup_s3_secret_key: SecretStr | None = Field(
        None,
        description="Data tier: the S3 secret access key (RMA_BACKUP_S3_SECRET_KEY; never "
        "logged or shown).",
    )
    backup_s3_addressing: Literal["path", "virtual"] = Field(
        "path",
        description="Data tier: S3 addressing, path (endpoint/bucket/key: MinIO, Ceph, AWS) or "
        "virtual (bucket.endpoint/key).",
    )
    backup_s3_part_size: int = Field(
        16 * 1024 * 1024,
        ge=5 * 1024 * 1024,
        le=5 * 1024**3,
        description="Data tier: bytes per part of a multipart upload to S3; a backup bigger "
        "than this is sent in parts, and the coordinator holds about two parts in memory per "
        "upload.",
    )
    backup_s3_timeout: float = Field(
        60.0, gt=0, description="Data tier: seconds to wait for the S3 store on each request."
    )
    backup_s3_ca_file: Path | None = Field(
        None, description="Data tier: CA bundle to verify the S3 endpoint's TLS certificate."
    )
    connect_max_per_key: int = Field(
        16,
        ge=1,
        description="Data tier: most TCP connections (rma connect) one API key may hold open.",
    )
    connect_max_connections: int = Field(
        1024, ge=1, description="Data tier: most TCP connections the coordinator carries."
    )
    connect_max_message_bytes: int = Field(
        1024 * 1024,
        ge=1024,
        le=16 * 1024 * 1024,
        description="Data tier: largest WebSocket message a client may send (then closed, 1009).",
    )
    connect_timeout: float = Field(
        5.0, gt=0, description="Gateway: seconds to connect to a worker."
    )
    first_byte_timeout: float = Field(
        120.0, gt=0, description="Gateway: seconds to the response headers."
    )
    stall_timeout: float = Field(
        60.0, gt=0, description="Gateway: seconds without a byte before a stream is broken."
    )
    total_timeout: float = Field(600.0, gt=0, description="Gateway: seconds for a whole request.")
    max_attempts: int = Field(
        3, ge=1, le=10, description="Gateway: attempts per request across workers."
    )
    hold_back_bytes: int = Field(
        1_048_576,
        ge=0,
        description="Gateway: a non-streamed answer up to this size is read whole before the "
        "client gets a byte, so a worker that fails mid-body is retried on another one; larger "
        "answers and SSE streams are relayed as they come (0: never hold back).",
    )
    cooldown_base: float = Field(
        5.0, gt=0, description="Gateway: first cool-down of a failed worker, seconds."
    )
    cooldown_max: float = Field(60.0, gt=0, description="Gateway: longest cool-down, seconds.")
    worker_capacity: int = Field(
        8, ge=1, description="Gateway: in-flight requests per worker service."
    )
    split_capacity: bool = Field(
        False,
        description="Several coordinators (PostgreSQL): each takes only its share of a worker "
        "service's capacity (worker_capacity or the catalog's, divided by the live coordinators "
        "counted in the database, at least 1), so together they stay within it.",
    )
    queue_size: int = Field(64, ge=0, description="Gateway: requests that may wait for capacity.")
    affinity: bool = Field(
        True,
        description="Gateway: send one conversation's chat requests to the same worker while it "
        "is healthy and not overloaded (prompt caches are reused).",
    )
    affinity_load_factor: float = Field(
        1.25,
        ge=1,
        description="Gateway: affinity holds while the worker's load stays within this factor "
        "of the average; past it, the conversation spills to the next worker.",
    )
    queue_timeout: float = Field(
        30.0, gt=0, description="Gateway: seconds a request may wait in the queue."
    )
    default_rpm: int = Field(
        600, ge=0, description="Default requests per minute of a new API key (0: unlimited)."
    )
    verify_rate_new: float = Field(
        1.0,
        ge=0,
        le=1,
        description="Verification: chance that an answer of a new worker (fewer than "
        "verify_new_results consecutive agreements) is re-run on a second worker.",
    )
    verify_new_results: int = Field(
        10, ge=0, description="Verification: consecutive agreements before the rate decays."
    )
    verify_decay: float = Field(
        0.8,
        gt=0,
        le=1,
        description="Verification: the rate is multiplied by this per further agreement.",
    )
    verify_rate_floor: float = Field(
        0.05,
        ge=0,
        le=1,
        description="Verification: the lowest chance for an established worker (0: none).",
    )
    verify_max_bytes: int = Field(
        1 << 20,
        ge=0,
        description="Verification: the largest answer held back for a comparison (bytes).",
    )
    verify_max_pending: int = Field(
        32, ge=0, description="Verification: background re-runs at once; past it, skipped."
    )
    canary_rate: float = Field(
        0.5,
        ge=0,
        le=1,
        description="Chat verification (catalog verify = canary): chance of a canary prompt "
        "after a served request, times the worker's verification rate (0: no canaries).",
    )
    speed_min_tokens: int = Field(
        32,
        ge=1,
        description="Speed suspicion: completion tokens an answer needs before its speed counts.",
    )
    speed_limit_gpu: float = Field(
        1000.0,
        ge=0,
        description="Speed suspicion: completion tokens/s a GPU-tier worker cannot beat (0: off).",
    )
    speed_limit_service: float = Field(
        150.0,
        ge=0,
        description="Speed suspicion: completion tokens/s a service-tier (CPU) worker cannot beat.",
    )
    speed_limit_data: float = Field(
        60.0,
        ge=0,
        description="Speed suspicion: completion tokens/s a data-tier worker cannot beat.",
    )
    queue_priority_aging: float = Field(
        1.0,
        ge=0,
        description="Giving back: priority a queued request gains per second it waits (its "
        "start is log1p(the key owner's credits)); the floor that keeps anonymous keys moving.",
    )
    credit_escrow_results: int = Field(
        10,
        ge=0,
        description="Credits: agreeing verified results a worker needs before its credits "
        "leave escrow (0: no escrow).",
    )
    quarantine_threshold: float = Field(
        0.3,
        ge=0,
        le=1,
        description="A worker whose reputation falls below this is quarantined (0: never).",
    )
    quarantine_min_verified: int = Field(
        3, ge=1, description="Verified results a worker needs before it can be quarantined."
    )
    redis_url: str | None = Field(
        None,
        description="Redis URL shared by several coordinators: rate limits, failed-auth counts "
        "and key revocations (redis://, rediss:// or unix://).",
    )
    redis_timeout: float = Field(
        0.5, gt=0, description="Seconds to wait for Redis before falling back to local limits."
    )
    key_refresh_interval: float = Field(
        30.0,
        gt=0,
        description="Seconds between reloads of the API keys from the database: the longest a "
        "key revoked on another coordinator stays valid here without Redis.",
    )
    key_miss_ttl: float = Field(
        5.0, ge=0, description="Seconds an unknown API key is remembered as unknown."
    )
    tunnel_ping_interval: float = Field(
        15.0, gt=0, description="Tunnel: seconds between keepalive pings to each worker."
    )
    tunnel_ping_timeout: float = Field(
        45.0, gt=0, description="Tunnel: seconds without a frame before a tunnel counts as dead."
    )

    @field_validator("service_key_data", mode="before")
    @classmethod
    def _service_key_data(cls, v: Any) -> Any:
        if isinstance(v, str):
            v = v.split(",")
        if isinstance(v, list | tuple):
            return [str(n).strip() for n in v if str(n).strip()]
        return v

    @field_validator("data_dir", mode="after")
    @classmethod
    def _expand(cls, v: Path) -> Path:
        return v.expanduser()

    @field_validator("redis_url", mode="after")
    @classmethod
    def _redis_url(cls, v: str | None) -> str | None:
        if not v:
            return None
        if not v.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://")
        import importlib.util

        if importlib.util.find_spec("redis") is None:
            raise ValueError(f"needs the redis package: {install_hint('redis')}")
        return v

    @model_validator(mode="after")
    def _backup_s3(self) -> CoordinatorSettings:
        if not self.backup_s3_url:
            return self
        from urllib.parse import urlsplit

        url = urlsplit(self.backup_s3_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError("backup_s3_url must be http(s)://host[:port]")
        if url.path not in ("", "/") or url.query or url.username:
            raise ValueError(
                "backup_s3_url is the endpoint only (http(s)://host[:port]): the bucket goes "
                "in backup_s3_bucket, the key prefix in backup_s3_prefix"
            )
        if not self.backup_s3_bucket:
            raise ValueError("backup_s3_url needs backup_s3_bucket (RMA_BACKUP_S3_BUCKET)")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{1,254}", self.backup_s3_bucket):
            raise ValueError(f"backup_s3_bucket {self.backup_s3_bucket!r} is not a bucket name")
        if not self.backup_s3_access_key or self.backup_s3_secret_key is None:
            raise ValueError(
                "backup_s3_url needs backup_s3_access_key and backup_s3_secret_key "
                "(RMA_BACKUP_S3_ACCESS_KEY, RMA_BACKUP_S3_SECRET_KEY)"
            )
        if self.max_backup_bytes > 10_000 * self.backup_s3_part_size:
            raise ValueError(
                "max_backup_bytes is more than 10,000 parts of backup_s3_part_size (S3's limit)"
            )
        return self

    @classmethod
    def load(cls, config_file: Path | None = None, **flags: Any) -> CoordinatorSettings:
        env_cfg = os.environ.get("RMA_CONFIG")
        path = config_file or (Path(env_cfg) if env_cfg else None)
        return cls(_config_file=path, **flags)

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'rma.db'}"

    @property
    def local_only(self) -> bool:
        """Whether only this machine can reach the coordinator (it listens on loopback)."""
        import ipaddress

        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    @property
    def grace(self) -> float:
        return self.offline_after if self.restart_grace is None else self.restart_grace

    @property
    def scheme(self) -> str:
        return "https" if self.tls_cert else "http"

    @property
    def url(self) -> str:
        if self.public_url:
            return self.public_url.rstrip("/")
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        return f"{self.scheme}://{host}:{self.port}"


class WorkerSettings(_Base):
    """The worker agent (``rma worker join``)."""

    toml_section: ClassVar[str | None] = "worker"

    coordinator_url: str = Field(
        DEFAULT_COORDINATOR_URL,
        description="Coordinator to join; several as URL1,URL2 (failover between them).",
    )
    token: str | None = Field(None, description="Join token (only needed for the first join).")
    name: str | None = Field(None, description="Worker name; default the host name.")
    labels: dict[str, str] = Field(
        default_factory=dict, description="Labels (KEY=VALUE) for placement."
    )
    owner: str = Field(
        "",
        max_length=64,
        description="Who donates this machine: credits add up per owner (default: the "
        "`owner` label).",
    )
    runtime: Literal["auto", "docker", "process"] = Field("auto", description="How services run.")
    image_prefix: str = Field(
        "",
        max_length=200,
        pattern=r"^[A-Za-z0-9._/:-]*$",
        description="Where the built-in services' images come from: replaces the catalog's "
        "`rma/` (`ghcr.io/acme/rma-` runs ghcr.io/acme/rma-llm:latest); unset: images built "
        "here with `rma service build NAME`.",
    )
    transport: Literal["auto", "tunnel", "direct"] = Field(
        "auto", description="How requests reach this worker."
    )
    advertise_host: str = Field(
        "127.0.0.1", description="Host the coordinator uses to reach services (direct)."
    )
    catalog: Path | None = Field(
        None, description="Operator's TOML file extending the built-in catalog."
    )
    data_dir: Path = Field(
        default_factory=lambda: default_data_dir() / "worker", description="Agent state."
    )
    ca_file: Path | None = Field(
        None, description="CA bundle to verify the coordinator's TLS certificate."
    )
    insecure: bool = Field(
        False,
        description="Skip TLS verification, and allow plain http:// to a coordinator on another "
        "machine (testing only).",
    )
    ca_hash: str | None = Field(
        None,
        description="The coordinator's pinned identity, sha256:<hex> of its TLS certificate (from "
        "`rma admin tokens create`); any other certificate is refused.",
    )
    services: Annotated[list[str] | None, NoDecode] = Field(
        None,
        description="Allow-list: only these catalog services run here (comma-separated in "
        "RMA_SERVICES); default every one that fits.",
    )
    max_cpu: float | None = Field(
        None, gt=0, description="CPU cores the pool may use here (each service is capped at it)."
    )
    max_memory: int | None = Field(
        None,
        description="Memory the pool may use here, e.g. 4G or 512M (all services together); "
        "stored in MB.",
    )
    max_vram: int | None = Field(
        None,
        description="GPU memory the pool may use here, e.g. 8G (all services together); 0: no GPU.",
    )
    trust_coordinator_catalog: bool = Field(
        False,
        description="Run the coordinator's definitions of services (command, image, env, "
        "volumes) instead of only this machine's catalog: for a donor who runs the coordinator.",
    )
    drain_timeout: float = Field(
        30.0, ge=0, description="Seconds to let in-flight requests finish on leave or pause."
    )
    backup_interval: float = Field(
        300.0,
        ge=0,
        description="Seconds between backups of each data service with a catalog `backup` "
        "(the RPO: what a holder's loss can cost); 0: none.",
    )
    check_interval: float = Field(
        5.0,
        gt=0,
        description="Seconds between checks of the donor's pause switch and computing "
        "preferences (prefs.json).",
    )
    health_timeout: float = Field(
        600.0, gt=0, description="Seconds a service may take to become healthy."
    )

    @field_validator("services", mode="before")
    @classmethod
    def _services(cls, v: Any) -> Any:
        if isinstance(v, str):
            v = v.split(",")
        if isinstance(v, list | tuple):
            names = [str(n).strip() for n in v if str(n).strip()]
            if not names:
                raise ValueError("name at least one service")
            return names
        return v

    @field_validator("max_memory", mode="before")
    @classmethod
    def _memory(cls, v: Any) -> Any:
        return None if v is None else parse_size(v)

    @field_validator("max_vram", mode="before")
    @classmethod
    def _vram(cls, v: Any) -> Any:
        if v is None:
            return None
        return 0 if str(v).strip() == "0" else parse_size(v)

    @field_validator("ca_hash", mode="after")
    @classmethod
    def _ca_hash(cls, v: str | None) -> str | None:
        from rma.pinning import normalize

        return normalize(v) if v else None

    @classmethod
    def load(cls, config_file: Path | None = None, **flags: Any) -> WorkerSettings:
        env_cfg = os.environ.get("RMA_CONFIG")
        path = config_file or (Path(env_cfg) if env_cfg else None)
        return cls(_config_file=path, **flags)
