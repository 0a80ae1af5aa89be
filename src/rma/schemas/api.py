"""Request and response models of the coordinator's HTTP API."""

from __future__ import annotations

import re
from datetime import datetime
from functools import cache
from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from rma.schemas.enums import ServiceState, Transport, WorkerStatus

__all__ = [
    "ApiKeyCreate",
    "ApiKeyCreated",
    "ApiKeyPublic",
    "BackupPublic",
    "Capabilities",
    "CreditBalance",
    "ErrorBody",
    "ErrorDetail",
    "EventPublic",
    "GpuInfo",
    "HeartbeatRequest",
    "HeartbeatResponse",
    "Load",
    "RegisterRequest",
    "RegisterResponse",
    "Resources",
    "RestoreRequest",
    "ServiceSpec",
    "ServiceStatus",
    "TokenCreate",
    "TokenCreated",
    "TokenPublic",
    "WorkerPublic",
]

_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"


@cache
def _numeric_fields(model: type[BaseModel]) -> frozenset[str]:
    names = set()
    for name, info in model.model_fields.items():
        kinds = get_args(info.annotation) or (info.annotation,)
        if bool not in kinds and any(k in (int, float) for k in kinds):
            names.add(name)
    return frozenset(names)


class _JsonNumbers(BaseModel):
    """Numbers in request bodies are JSON numbers: ``false`` or ``"5"`` is refused, not cast
    (``4.0`` is an integer in JSON and stays accepted); strings hold no NUL character."""

    @field_validator("*", mode="before")
    @classmethod
    def _numbers_only(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, (bool, str, bytes)) and info.field_name in _numeric_fields(cls):
            raise ValueError(f"must be a number, not {type(value).__name__}")
        if isinstance(value, str) and "\x00" in value:  # PostgreSQL cannot store it: a 422
            raise ValueError("must not contain NUL characters")
        return value


class _Strict(_JsonNumbers):
    model_config = ConfigDict(extra="forbid")


class ErrorDetail(BaseModel):
    code: str
    message: str


class ErrorBody(BaseModel):
    """Every error answer: ``{"error": {"code": ..., "message": ...}}``."""

    error: ErrorDetail


# --- hardware and load ---------------------------------------------------------------------------


class GpuInfo(_JsonNumbers):
    name: str = Field(max_length=200)
    memory_mb: int = Field(ge=0)
    memory_free_mb: int | None = Field(None, ge=0)
    utilization_percent: float | None = Field(None, ge=0, le=100)
    driver: str | None = Field(None, max_length=100)
    uuid: str | None = Field(None, max_length=100)
    index: int | None = Field(None, ge=0)


class Capabilities(_JsonNumbers):
    """What a worker's machine has (``rma worker detect``)."""

    cpu_cores: int = Field(ge=1, le=4096)
    memory_mb: int = Field(ge=0)
    disk_free_mb: int = Field(0, ge=0)
    gpus: list[GpuInfo] = Field(default_factory=list, max_length=64)
    docker: bool = Field(False, strict=True)
    os: str = Field("", max_length=100)
    arch: str = Field("", max_length=50)
    cpu_model: str | None = Field(None, max_length=200)
    memory_available_mb: int | None = Field(None, ge=0)

    @property
    def max_vram_mb(self) -> int:
        return max((g.memory_mb for g in self.gpus), default=0)


class Load(_JsonNumbers):
    cpu_percent: float = Field(0.0, ge=0, le=100 * 4096)
    memory_percent: float = Field(0.0, ge=0, le=100)
    gpu_percent: float | None = Field(None, ge=0, le=100)
    gpu_memory_percent: float | None = Field(None, ge=0, le=100)


# --- the catalog ---------------------------------------------------------------------------------


class Resources(BaseModel):
    memory_mb: int = Field(0, ge=0)
    cpu_cores: float = Field(0, ge=0)
    vram_mb: int = Field(0, ge=0)


class ServiceSpec(BaseModel):
    """One catalog entry; also what an assignment carries to the agent."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=_NAME)
    description: str = ""
    tier: int = Field(2, ge=1, le=3)
    kind: Literal["openai", "http", "tcp"] = "http"
    models: list[str] = Field(default_factory=list)
    task: Literal["chat", "embeddings"] | None = Field(
        None, description="What its models do (kind openai): chat/completions or embeddings."
    )
    endpoints: list[str] = Field(
        default_factory=list,
        max_length=64,
        description='More /v1 paths it answers, routed by the request\'s model (e.g. "/v1/rerank", '
        '"/v1/audio/transcriptions"; "/v1/responses/*": that path and every path below it).',
    )
    image: str | None = None
    command: list[str] | None = None
    args: list[str] = Field(
        default_factory=list, description="Arguments to the image's entrypoint (docker runtime)."
    )
    extra: str | None = Field(
        None, description="The pip extra (or module) the process command needs."
    )
    requires: list[str] = Field(
        default_factory=list, description="Python modules the process command imports."
    )
    port: int = Field(8000, ge=1, le=65535)
    programs: list[str] = Field(
        default_factory=list,
        description="Programs the process command needs (on PATH, or in the system's "
        "PostgreSQL directories); the process runtime cannot run it without them.",
    )
    health: str = Field(
        "/health",
        description='GET path answering 200 when ready; "tcp" (accepts connections); '
        '"postgres" or "redis" (answers its protocol).',
    )
    backup: Literal["pg_dumpall", "redis-rdb"] | None = Field(
        None,
        description="How the agent backs it up for the coordinator's store and restores it on a "
        'new holder: "pg_dumpall" (SQL of every database), "redis-rdb" (Redis SAVE, dump.rdb).',
    )
    connect_url: str | None = Field(
        None,
        description="kind tcp: the connection string a client uses through `rma connect`, "
        "with {host} and {port} (e.g. redis://{host}:{port}).",
    )
    gpu: bool = False
    replicas: int = Field(
        0, ge=0, description="The fewest copies in the pool; 0: on every worker that fits."
    )
    max_replicas: int | None = Field(
        None, ge=1, description="The most copies in the pool (caps scaling); unset: no cap."
    )
    priority: int = Field(
        0, description="Placement order: higher first (a big model is not starved by small ones)."
    )
    capacity: int | None = Field(
        None, ge=1, description="Requests one copy serves at once; unset: the gateway's default."
    )
    gpu_devices: list[Annotated[int, Field(ge=0, le=63)]] = Field(
        default_factory=list,
        max_length=16,
        description="Set by the coordinator in an assignment: the GPU indices it placed it on.",
    )
    gpu_share: float | None = Field(
        None,
        gt=0,
        le=1,
        description="Set by the coordinator in an assignment: the share of its GPU's memory.",
    )
    resources: Resources = Field(default_factory=Resources)
    env: dict[str, str] = Field(default_factory=dict)
    labels: dict[str, str] = Field(
        default_factory=dict, description="Worker labels required to host it."
    )
    volumes: dict[str, str] = Field(
        default_factory=dict, description="Container path -> volume name."
    )
    verify: str | None = Field(
        None,
        description='How two answers are compared to verify a worker: "cosine:0.99" '
        '(embeddings), "json" (equal JSON), "text:0.9" (text similarity), "exact" (same '
        'bytes), "canary" (chat: canary prompts and speed suspicion); unset: never verified.',
    )
    credit_weight: float = Field(
        1.0, ge=0, description="Credits per service-second (a GPU second is worth more)."
    )
    vision: list[str] = Field(
        default_factory=list,
        description="Of its `models`, those that take image input (chat messages with "
        "`image_url` parts); a request with images for any other model is refused.",
    )
    model_pull: Literal["ollama"] | None = Field(
        None,
        description="How the agent fetches the entry's `models` once the service answers, "
        'before it is healthy: "ollama" (POST /api/pull, with progress); unset: nothing.',
    )

    @field_validator("vision")
    @classmethod
    def _check_vision(cls, value: list[str], info: ValidationInfo) -> list[str]:
        models = info.data.get("models") or []
        unknown = [m for m in value if m not in models]
        if unknown:
            raise ValueError(f"vision lists models that are not in models: {', '.join(unknown)}")
        return value

    @field_validator("endpoints")
    @classmethod
    def _check_endpoints(cls, value: list[str], info: ValidationInfo) -> list[str]:
        if value and info.data.get("kind") == "tcp":
            raise ValueError('a kind = "tcp" service has no HTTP endpoints')
        if value and not info.data.get("models"):
            raise ValueError("endpoints need models: a /v1 request is routed by its model")
        out: list[str] = []
        for raw in value:
            path = normalize_endpoint(raw)
            if path not in out:
                out.append(path)
        return out

    def serves_endpoint(self, path: str) -> bool:
        """Whether ``path`` (e.g. ``/v1/rerank``) is one of its declared ``endpoints``."""
        return any(endpoint_matches(e, path) for e in self.endpoints)

    @field_validator("verify")
    @classmethod
    def _check_verify(cls, value: str | None) -> str | None:
        if value is None:
            return None
        kind, threshold = parse_verify(value)
        return f"{kind}:{threshold:g}" if threshold is not None else kind

    @property
    def tier_name(self) -> str:
        return {1: "gpu", 2: "service", 3: "data"}[self.tier]


_ENDPOINT = re.compile(r"^/v1(?:/[A-Za-z0-9._~:-]+)+(?:/\*)?$")
#: Paths the gateway answers itself: no catalog entry can take them over.
RESERVED_ENDPOINTS = ("/v1/models",)


def normalize_endpoint(raw: str) -> str:
    """``"/v1/rerank/"`` -> ``"/v1/rerank"``; ``ValueError`` with a clear message when ``raw``
    is not a path under ``/v1/`` (a trailing ``/*`` takes every path below)."""
    path = raw.strip()
    if path.endswith("/") and len(path) > 1:
        path = path.rstrip("/")
    segments = path.split("/")
    if not _ENDPOINT.fullmatch(path) or any(s in (".", "..") for s in segments):
        raise ValueError(
            f'an endpoint is a path under /v1/ such as "/v1/rerank" or "/v1/responses/*", '
            f"not {raw!r}"
        )
    base = path.removesuffix("/*")
    if any(base == r or base.startswith(r + "/") for r in RESERVED_ENDPOINTS):
        raise ValueError(f"{raw!r} is the gateway's own route, not a service's endpoint")
    return path


def endpoint_matches(endpoint: str, path: str) -> bool:
    """Whether a declared ``endpoint`` (``/v1/x`` or ``/v1/x/*``) covers a request's ``path``."""
    path = path.rstrip("/") or "/"
    if endpoint.endswith("/*"):
        base = endpoint[:-2]
        return path == base or path.startswith(base + "/")
    return path == endpoint


#: ``verify`` kinds -> their default threshold (``None``: the kind takes none).
VERIFY_KINDS: dict[str, float | None] = {
    "cosine": 0.99,
    "text": 0.9,
    "json": None,
    "exact": None,
    "canary": None,  # chat/completions: canary prompts and speed suspicion (trust/canary.py)
}


def parse_verify(value: str) -> tuple[str, float | None]:
    """``"cosine:0.99"`` -> ``("cosine", 0.99)``; raises ``ValueError`` with a clear message."""
    kind, sep, raw = value.strip().partition(":")
    kind = kind.strip().lower()
    if kind not in VERIFY_KINDS:
        raise ValueError(
            f'verify must be one of {", ".join(sorted(VERIFY_KINDS))} (e.g. "cosine:0.99"), '
            f"not {value!r}"
        )
    default = VERIFY_KINDS[kind]
    if not sep:
        return kind, default
    if default is None:
        raise ValueError(f"verify {kind!r} takes no threshold: {value!r}")
    try:
        threshold = float(raw)
    except ValueError:
        raise ValueError(f"verify threshold must be a number in 0..1: {value!r}") from None
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"verify threshold must be a number in 0..1: {value!r}")
    return kind, threshold


# --- workers -------------------------------------------------------------------------------------


class RegisterRequest(_Strict):
    token: str | None = Field(
        None, max_length=200, description="Join token; optional when worker_id re-joins."
    )
    name: str = Field(pattern=_NAME)
    capabilities: Capabilities
    labels: dict[str, str] = Field(default_factory=dict, max_length=64)
    owner: str = Field(
        "", max_length=64, description="Who donates this machine (credits add up per owner)."
    )
    version: str = Field("", max_length=50)
    worker_id: str | None = Field(None, max_length=64)
    worker_secret: str | None = Field(
        None, max_length=200, description="Proves worker_id on re-join."
    )
    transport: Transport = Transport.TUNNEL
    endpoint: str | None = Field(
        None, max_length=500, description="Base URL for the direct transport."
    )
    runnable: list[str] | None = Field(None, max_length=256)


class RegisterResponse(BaseModel):
    worker_id: str
    tier: int
    tier_name: str
    credential: str
    credential_expires_at: datetime
    heartbeat_interval: float
    assignments: list[ServiceSpec]
    worker_secret: str | None = Field(
        None, description="Given on the first join only: keep it (0600) to re-join as this worker."
    )
    service_key: str | None = Field(
        None,
        description="A client API key of this worker's own, for its services that call the pool "
        "(rag, notes, doc) through the gateway; given when the pool requires API keys, replaced "
        "at each (re-)join.",
    )


class ServiceStatus(_JsonNumbers):
    name: str = Field(pattern=_NAME)
    state: ServiceState
    healthy: bool = Field(False, strict=True)
    inflight: int = Field(0, ge=0)
    endpoint: str | None = Field(None, max_length=500)
    message: str | None = Field(None, max_length=1000)


class HeartbeatRequest(_Strict):
    load: Load = Field(default_factory=Load)
    services: list[ServiceStatus] = Field(default_factory=list, max_length=256)
    draining: bool = Field(False, strict=True)
    paused: bool = Field(
        False,
        strict=True,
        description="The donor paused this agent: it runs nothing and takes no requests.",
    )
    pause_reason: str | None = Field(None, max_length=200, description="Why it is paused.")


class HeartbeatResponse(BaseModel):
    assignments: list[ServiceSpec]
    heartbeat_interval: float
    status: WorkerStatus
    credential: str | None = None
    credential_expires_at: datetime | None = None
    credits: float | None = Field(
        None, description="This worker's credits in the ledger (the donor's own, for status)."
    )
    escrow: float | None = Field(None, description="This worker's credits held in escrow.")
    restore: dict[str, str] = Field(
        default_factory=dict,
        description="Data services to restore now (rma admin restore): service -> backup id; "
        "sent once.",
    )
    backup: list[str] = Field(
        default_factory=list,
        description="Data services to back up now (an operator's drain: the fresh backup their "
        "next holder restores); sent until the backup is in.",
    )


class WorkerPublic(BaseModel):
    id: str
    name: str
    status: WorkerStatus
    tier: int
    tier_name: str
    capabilities: Capabilities
    labels: dict[str, str]
    owner: str = ""
    services: list[ServiceStatus]
    assignments: list[str]
    load: Load
    transport: Transport
    trusted: bool
    #: Services the worker reports but was not assigned: never routed to (``claim_refused``).
    refused: list[str] = Field(default_factory=list)
    #: Removed by the operator (``rma admin remove``), as opposed to by the sweeper for silence.
    revoked: bool = False
    #: Why the donor's agent is paused (status ``paused``), as it reported.
    pause_reason: str | None = None
    #: Verification (``rma admin quarantine``): 0..1, results compared, results found wrong.
    reputation: float = 0.5
    quarantined: bool = False
    verified: int = 0
    disagreements: int = 0
    version: str
    endpoint: str | None
    registered_at: datetime
    last_heartbeat_at: datetime | None


# --- secrets -------------------------------------------------------------------------------------


class TokenCreate(_Strict):
    ttl: float = Field(1800.0, gt=0, le=366 * 86400, description="Seconds until it expires.")
    uses: int | None = Field(
        1, ge=1, description="How many registrations it allows; null: unlimited."
    )
    label: str = Field("", max_length=200)


class TokenPublic(BaseModel):
    id: str
    label: str
    created_at: datetime
    expires_at: datetime
    uses: int | None
    used: int
    revoked: bool
    status: Literal["active", "expired", "used", "revoked"]


class TokenCreated(TokenPublic):
    token: str = Field(description="The secret; shown once.")
    join_command: str | None = Field(
        None, description="A ready `rma worker join ...` line for a donor (with the pin)."
    )
    ca_hash: str | None = Field(
        None, description="sha256:<hex> of the coordinator's TLS certificate, when it serves TLS."
    )


class ApiKeyCreate(_Strict):
    name: str = Field("", max_length=200)
    rpm: int | None = Field(
        None, ge=0, le=1_000_000, description="Requests per minute; 0 unlimited."
    )
    owner: str = Field(
        "", max_length=64, description="The donor it belongs to: queued requests of owners "
        "who contributed more go first.",
    )  # fmt: skip
    services: list[Annotated[str, Field(pattern=_NAME)]] | None = Field(
        None,
        max_length=64,
        description="The services it may use (catalog names); unset: every service except the "
        "data tier's (kind tcp), which a key must name to reach with rma connect.",
    )


class ApiKeyPublic(BaseModel):
    id: str
    name: str
    rpm: int
    owner: str = ""
    services: list[str] | None = None
    created_at: datetime
    revoked: bool
    last_used_at: datetime | None = None


class ApiKeyCreated(ApiKeyPublic):
    key: str = Field(description="The secret; shown once.")


class BackupPublic(BaseModel):
    """One backup in the coordinator's store (``rma admin backups``)."""

    id: str = Field(description="<taken, ms since the epoch>-<worker id>: rma admin restore --at.")
    service: str
    worker_id: str
    worker: str
    created_at: datetime
    size: int
    sha256: str
    location: str = Field(
        "", description="Where its bytes are: s3:<bucket>, or local:<coordinator> (its data dir)."
    )


class RestoreRequest(_Strict):
    at: str | None = Field(
        None, max_length=100, description="The backup's id (rma admin backups); unset: newest."
    )


class CreditBalance(BaseModel):
    """One line of ``rma admin credits``: a worker, an owner or a client key."""

    id: str | None
    name: str
    owner: str
    credits: float
    escrow: float
    requests: int


class EventPublic(BaseModel):
    id: int
    ts: datetime
    kind: str
    worker_id: str | None
    message: str
    data: dict[str, Any] = Field(default_factory=dict)
