"""The one HTTP client for the coordinator's API, used by the CLI, the dashboard and the agent.

Light on purpose: httpx and pydantic only, so ``rma infer`` starts fast.
"""

from __future__ import annotations

import hashlib
import json
import ssl
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self
from urllib.parse import quote

import httpx

from rma import __version__
from rma.schemas.api import (
    ApiKeyCreated,
    ApiKeyPublic,
    BackupPublic,
    CreditBalance,
    EventPublic,
    HeartbeatRequest,
    HeartbeatResponse,
    RegisterRequest,
    RegisterResponse,
    TokenCreated,
    TokenPublic,
    WorkerPublic,
)


def _seg(ident: str) -> str:
    """An id as one URL path segment: ``../keys/x`` must never address another resource."""
    return quote(ident, safe="")


class RmaError(Exception):
    """A failed call: the coordinator's ``{"error": {code, message}}`` or a transport failure."""

    def __init__(self, code: str, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.status is not None:
            body["status"] = self.status
        return {"error": body}


class PinMismatch(ssl.SSLCertVerificationError):
    """The coordinator's certificate does not hash to the pinned ``--ca-hash``."""


class _PinnedObject(ssl.SSLObject):
    """Checks the peer's certificate against the context's pin once the handshake is done."""

    def do_handshake(self) -> None:
        super().do_handshake()
        _check_pin(self.context, self.getpeercert(binary_form=True))


class _PinnedSocket(ssl.SSLSocket):
    def do_handshake(self, block: bool = False) -> None:
        super().do_handshake(block)
        _check_pin(self.context, self.getpeercert(binary_form=True))


class PinnedContext(ssl.SSLContext):
    """A client TLS context that accepts exactly the certificate hashing to ``pin``.

    Without a CA file the pin replaces CA and host name checks (a self-signed certificate is
    fine: the pin is stronger); with one, both must pass.  Works for httpx and websockets alike
    (they wrap sockets and memory BIOs through ``sslsocket_class`` / ``sslobject_class``).
    """

    pin: str

    def __new__(cls, pin: str, ca_file: Path | str | None = None) -> PinnedContext:
        ctx = super().__new__(cls, ssl.PROTOCOL_TLS_CLIENT)
        ctx.pin = pin
        if ca_file:
            ctx.load_verify_locations(cafile=str(ca_file))
        else:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        ctx.sslobject_class = _PinnedObject
        ctx.sslsocket_class = _PinnedSocket
        return ctx

    def __init__(self, pin: str, ca_file: Path | str | None = None) -> None:
        pass  # everything happens in __new__ (SSLContext.__init__ takes the protocol)


def _check_pin(ctx: ssl.SSLContext, der: bytes | None) -> None:
    from rma.pinning import der_hash

    pin = getattr(ctx, "pin", None)
    if pin is None:
        return
    seen = der_hash(der) if der else "no certificate"
    if seen != pin:
        raise PinMismatch(
            f"its TLS certificate is {seen}, not the pinned {pin} (--ca-hash): "
            "this is not the coordinator the join line was made for"
        )


def tls_verify(
    ca_file: Path | str | None = None, insecure: bool = False, ca_hash: str | None = None
) -> ssl.SSLContext | bool:
    """Certificate verification: on by default, a private CA with ``ca_file``, and with
    ``ca_hash`` (``sha256:...``) only the certificate that hashes to it (even with ``insecure``).

    Raises :class:`RmaError` when ``ca_file`` cannot be read or holds no certificate.
    """
    if ca_hash:
        try:
            return PinnedContext(ca_hash, ca_file)
        except FileNotFoundError:
            raise RmaError("bad_ca_file", f"CA file {ca_file} does not exist") from None
        except (OSError, ssl.SSLError) as exc:
            raise RmaError(
                "bad_ca_file", f"CA file {ca_file} holds no usable PEM certificate: {exc}"
            ) from None
    if insecure:
        return False
    if ca_file:
        try:
            return ssl.create_default_context(cafile=str(ca_file))
        except FileNotFoundError:
            raise RmaError("bad_ca_file", f"CA file {ca_file} does not exist") from None
        except (OSError, ssl.SSLError) as exc:
            raise RmaError(
                "bad_ca_file", f"CA file {ca_file} holds no usable PEM certificate: {exc}"
            ) from None
    return True


def error_from_response(resp: httpx.Response) -> RmaError:
    try:
        body = resp.json()
        err = body["error"]
        return RmaError(str(err["code"]), str(err["message"]), resp.status_code)
    except (ValueError, KeyError, TypeError):
        text = resp.text.strip()[:200] or resp.reason_phrase
        return RmaError("http_error", f"HTTP {resp.status_code}: {text}", resp.status_code)


def _certificate_problem(exc: BaseException) -> str | None:
    """The reason when ``exc`` (or what caused it) is a failed TLS certificate check."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError):
            return str(seen.verify_message or seen.reason or seen)
        if "CERTIFICATE_VERIFY_FAILED" in str(seen):
            return str(seen)
        seen = seen.__cause__ or seen.__context__
    return None


def pin_problem(exc: BaseException) -> str | None:
    """The message when ``exc`` (or what caused it) is a pinned certificate that did not match."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, PinMismatch):
            return str(seen.args[0]) if seen.args else str(seen)
        seen = seen.__cause__ or seen.__context__
    return None


def transport_error(exc: httpx.HTTPError, base_url: str) -> RmaError:
    pinned = pin_problem(exc)
    if pinned is not None:
        return RmaError("coordinator_mismatch", f"refusing the coordinator at {base_url}: {pinned}")
    cert = _certificate_problem(exc)
    if cert is not None:
        return RmaError(
            "tls_verify_failed",
            f"the TLS certificate of {base_url} could not be verified ({cert}); "
            "for a private CA pass --ca-file (or set RMA_CA_FILE)",
        )
    if isinstance(exc, httpx.ConnectError):
        return RmaError("unreachable", f"cannot reach the coordinator at {base_url}: {exc}")
    if isinstance(exc, httpx.TimeoutException):
        return RmaError("timeout", f"the coordinator at {base_url} did not answer in time")
    return RmaError("transport", f"{type(exc).__name__}: {exc}")


def split_urls(value: str) -> list[str]:
    """``URL1,URL2`` -> its URLs, without trailing slashes (one URL is a list of one)."""
    urls = [u.strip().rstrip("/") for u in value.split(",") if u.strip()]
    return urls or [value.strip().rstrip("/")]


class Coordinators:
    """The coordinators a client may talk to (``--coordinator URL1,URL2``): the one in use, and
    the move to the next when it cannot be reached.  Shared by the agent's client and tunnel,
    so heartbeats and the tunnel move together."""

    def __init__(self, urls: str | Sequence[str]) -> None:
        self.all = split_urls(urls) if isinstance(urls, str) else [u.rstrip("/") for u in urls]
        self._index = 0
        #: How many times a failure moved this client to another coordinator.
        self.failovers = 0

    @property
    def current(self) -> str:
        return self.all[self._index]

    def failed(self, url: str) -> bool:
        """``url`` could not be reached: move on to the next coordinator if ``url`` is still the
        one in use (two failures of the same one move once).  Whether there was another."""
        if len(self.all) < 2:
            return False
        if url == self.current:
            self._index = (self._index + 1) % len(self.all)
            self.failovers += 1
        return True


class CoordinatorClient:
    """``async with CoordinatorClient(url, admin_key=...) as c: await c.workers()``.

    ``url`` may name several coordinators (``URL1,URL2``, or a :class:`Coordinators`): a call
    that cannot reach one is sent to the next (always when the connection could not be made, so
    nothing was sent; otherwise only for idempotent calls).
    """

    def __init__(
        self,
        base_url: str | Coordinators,
        *,
        admin_key: str | None = None,
        api_key: str | None = None,
        credential: str | None = None,
        timeout: float = 30.0,
        verify: ssl.SSLContext | bool = True,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.urls = base_url if isinstance(base_url, Coordinators) else Coordinators(base_url)
        self.admin_key = admin_key
        self.api_key = api_key
        self.credential = credential
        self.verify = verify
        self._http = httpx.AsyncClient(
            base_url=self.urls.current,
            timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
            verify=verify,
            transport=transport,
            headers={"user-agent": f"rma/{__version__}"},
        )

    @property
    def base_url(self) -> str:
        """The coordinator in use now."""
        return self.urls.current

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    # --- plumbing ---------------------------------------------------------------------------------

    def _auth(self, role: str) -> dict[str, str]:
        secret = {"admin": self.admin_key, "client": self.api_key, "worker": self.credential}[role]
        if role == "admin" and not secret:
            raise RmaError(
                "no_admin_key",
                "no admin key: pass --admin-key, set RMA_ADMIN_KEY, or run on the coordinator's "
                "machine where <data-dir>/admin.key is read",
            )
        return {"authorization": f"Bearer {secret}"} if secret else {}

    async def request(
        self,
        method: str,
        path: str,
        *,
        role: str = "admin",
        json_body: Any = None,
        params: Mapping[str, Any] | None = None,
        idempotent: bool | None = None,
    ) -> Any:
        """One call: the decoded JSON body (``None`` for 204), or :class:`RmaError`.

        An idempotent call (GET, or ``idempotent=True``) that meets a kept-alive connection the
        coordinator closed just before (its keep-alive timeout) is sent again at once on a new
        connection, instead of failing (a heartbeat sent late would otherwise wait for a retry).
        """
        again = method == "GET" if idempotent is None else idempotent
        tried = 0
        while True:
            url = self.base_url
            try:
                resp = await self._send(method, url + path, json_body, params, role, again)
                break
            except httpx.HTTPError as exc:
                error = transport_error(exc, url)
                if error.code == "coordinator_mismatch" or tried + 1 >= len(self.urls.all):
                    raise error from None
                self.urls.failed(url)
                tried += 1
                if not (again or isinstance(exc, httpx.ConnectError)):
                    raise error from None  # it may have been done: not sent twice
        if resp.status_code >= 400:
            raise error_from_response(resp)
        if resp.status_code == 204 or not resp.content:
            return None
        try:
            return resp.json()
        except ValueError:
            raise RmaError(
                "bad_response", f"the coordinator sent non-JSON: {resp.text[:200]}"
            ) from None

    async def _send(
        self,
        method: str,
        url: str,
        json_body: Any,
        params: Mapping[str, Any] | None,
        role: str,
        again: bool,
    ) -> httpx.Response:
        """One call to one coordinator; an idempotent one meeting a kept-alive connection
        closed just before is sent again at once on a new one."""
        for attempt in (1, 2):
            try:
                return await self._http.request(
                    method, url, json=json_body, params=params, headers=self._auth(role)
                )
            except httpx.RemoteProtocolError:
                if not again or attempt == 2:
                    raise
        raise AssertionError("unreachable")

    # --- workers (the agent) ----------------------------------------------------------------------

    async def register(self, req: RegisterRequest) -> RegisterResponse:
        data = await self.request(
            "POST", "/api/worker/register", role="worker", json_body=req.model_dump(mode="json")
        )
        resp = RegisterResponse.model_validate(data)
        self.credential = resp.credential
        return resp

    async def upload_backup(self, service: str, path: Path) -> dict[str, Any]:
        """Send a data service's backup file to the coordinator's store (worker role)."""

        import anyio

        async def chunks() -> AsyncIterator[bytes]:
            async with await anyio.open_file(path, "rb") as fh:
                while chunk := await fh.read(256 * 1024):
                    yield chunk

        try:
            resp = await self._http.put(
                f"/api/worker/backups/{service}",
                content=chunks(),
                headers={**self._auth("worker"), "content-type": "application/octet-stream"},
                timeout=httpx.Timeout(600.0, connect=10.0),
            )
        except httpx.HTTPError as exc:
            raise transport_error(exc, self.base_url) from None
        if resp.status_code >= 400:
            raise error_from_response(resp)
        data: dict[str, Any] = resp.json()
        return data

    async def download_backup(self, service: str, dest: Path, backup_id: str | None = None) -> bool:
        """The newest backup of ``service`` (or ``backup_id``) into ``dest``; ``False`` when
        there is none (yet)."""
        import anyio

        tmp = dest.with_name(dest.name + ".part")
        try:
            async with self._http.stream(
                "GET",
                f"/api/worker/backups/{service}",
                params={"id": backup_id} if backup_id else None,
                headers=self._auth("worker"),
                timeout=httpx.Timeout(600.0, connect=10.0),
            ) as resp:
                if resp.status_code == 404:  # none yet, or no backup in the coordinator's catalog
                    return False
                if resp.status_code >= 400:
                    await resp.aread()
                    raise error_from_response(resp)
                digest = hashlib.sha256()
                async with await anyio.open_file(tmp, "wb") as fh:
                    async for chunk in resp.aiter_bytes():
                        digest.update(chunk)
                        await fh.write(chunk)
                expected = resp.headers.get("x-rma-backup-sha256")
        except httpx.HTTPError as exc:
            tmp.unlink(missing_ok=True)
            raise transport_error(exc, self.base_url) from None
        if expected and digest.hexdigest() != expected:  # the coordinator checks it too
            tmp.unlink(missing_ok=True)
            raise RmaError("backup_corrupt", f"the backup of {service} failed its SHA-256 check")
        tmp.replace(dest)
        return True

    async def heartbeat(self, req: HeartbeatRequest) -> HeartbeatResponse:
        data = await self.request(
            "POST",
            "/api/worker/heartbeat",
            role="worker",
            json_body=req.model_dump(mode="json"),
            idempotent=True,  # a heartbeat states the present: sending it twice changes nothing
        )
        resp = HeartbeatResponse.model_validate(data)
        if resp.credential:
            self.credential = resp.credential
        return resp

    async def leave(self) -> None:
        await self.request("POST", "/api/worker/leave", role="worker")

    # --- admin ------------------------------------------------------------------------------------

    async def workers(self, status: str | None = None) -> list[WorkerPublic]:
        params = {"status": status} if status else None
        data = await self.request("GET", "/api/admin/workers", params=params)
        return [WorkerPublic.model_validate(w) for w in data]

    async def worker(self, worker_id: str) -> WorkerPublic:
        return WorkerPublic.model_validate(
            await self.request("GET", f"/api/admin/workers/{_seg(worker_id)}")
        )

    async def drain(self, worker_id: str) -> WorkerPublic:
        data = await self.request("POST", f"/api/admin/workers/{_seg(worker_id)}/drain")
        return WorkerPublic.model_validate(data)

    async def undrain(self, worker_id: str) -> WorkerPublic:
        data = await self.request("POST", f"/api/admin/workers/{_seg(worker_id)}/undrain")
        return WorkerPublic.model_validate(data)

    async def trust(self, worker_id: str) -> WorkerPublic:
        data = await self.request("POST", f"/api/admin/workers/{_seg(worker_id)}/trust")
        return WorkerPublic.model_validate(data)

    async def untrust(self, worker_id: str) -> WorkerPublic:
        data = await self.request("POST", f"/api/admin/workers/{_seg(worker_id)}/untrust")
        return WorkerPublic.model_validate(data)

    async def credits(self, by: str = "worker", since: str | None = None) -> list[CreditBalance]:
        params = {"by": by} if since is None else {"by": by, "since": since}
        data = await self.request("GET", "/api/admin/credits", params=params)
        return [CreditBalance.model_validate(x) for x in data]

    async def quarantine(self, worker_id: str) -> WorkerPublic:
        data = await self.request("POST", f"/api/admin/workers/{_seg(worker_id)}/quarantine")
        return WorkerPublic.model_validate(data)

    async def unquarantine(self, worker_id: str) -> WorkerPublic:
        data = await self.request("POST", f"/api/admin/workers/{_seg(worker_id)}/unquarantine")
        return WorkerPublic.model_validate(data)

    async def remove(self, worker_id: str) -> WorkerPublic:
        return WorkerPublic.model_validate(
            await self.request("DELETE", f"/api/admin/workers/{_seg(worker_id)}")
        )

    async def create_token(self, ttl: float, uses: int | None, label: str) -> TokenCreated:
        body = {"ttl": ttl, "uses": uses, "label": label}
        return TokenCreated.model_validate(
            await self.request("POST", "/api/admin/tokens", json_body=body)
        )

    async def tokens(self) -> list[TokenPublic]:
        return [
            TokenPublic.model_validate(t) for t in await self.request("GET", "/api/admin/tokens")
        ]

    async def revoke_token(self, token_id: str) -> TokenPublic:
        return TokenPublic.model_validate(
            await self.request("DELETE", f"/api/admin/tokens/{_seg(token_id)}")
        )

    async def create_key(
        self, name: str, rpm: int | None, owner: str = "", services: list[str] | None = None
    ) -> ApiKeyCreated:
        body: dict[str, Any] = {"name": name, "rpm": rpm}
        if owner:
            body["owner"] = owner
        if services:
            body["services"] = services
        return ApiKeyCreated.model_validate(
            await self.request("POST", "/api/admin/keys", json_body=body)
        )

    async def restore(self, service: str, at: str | None = None) -> dict[str, Any]:
        body = {"at": at} if at else {}
        data: dict[str, Any] = await self.request(
            "POST", f"/api/admin/backups/{quote(service, safe='')}/restore", json_body=body
        )
        return data

    async def backups(self) -> list[BackupPublic]:
        return [
            BackupPublic.model_validate(b) for b in await self.request("GET", "/api/admin/backups")
        ]

    async def keys(self) -> list[ApiKeyPublic]:
        return [
            ApiKeyPublic.model_validate(k) for k in await self.request("GET", "/api/admin/keys")
        ]

    async def revoke_key(self, key_id: str) -> ApiKeyPublic:
        return ApiKeyPublic.model_validate(
            await self.request("DELETE", f"/api/admin/keys/{_seg(key_id)}")
        )

    async def stats(self) -> dict[str, Any]:
        data: dict[str, Any] = await self.request("GET", "/api/admin/stats")
        return data

    async def services(self, *, show_all: bool = False) -> list[dict[str, Any]]:
        """Per catalog service: wanted, assigned, healthy, in flight, queued (the scheduler);
        data services also ``holder``, ``connections``, ``last_backup``.  Data services the pool
        neither holds nor could place are left out unless ``show_all``."""
        params = {"all": "true"} if show_all else None
        data: list[dict[str, Any]] = await self.request("GET", "/api/admin/services", params=params)
        return data

    async def reload_catalog(self) -> dict[str, Any]:
        data: dict[str, Any] = await self.request("POST", "/api/admin/catalog/reload")
        return data

    async def events(self, limit: int = 100) -> list[EventPublic]:
        data = await self.request("GET", "/api/admin/events", params={"limit": limit})
        return [EventPublic.model_validate(e) for e in data]

    async def follow_events(self, since: int | None = None) -> AsyncIterator[EventPublic]:
        """Yield events as they happen (SSE); ends when the connection does."""
        params: dict[str, Any] = {"follow": "true"}
        if since is not None:
            params["since"] = since
        try:
            async with self._http.stream(
                "GET",
                self.base_url + "/api/admin/events",
                params=params,
                headers=self._auth("admin"),
                timeout=httpx.Timeout(None, connect=10.0),
            ) as resp:
                if resp.status_code >= 400:
                    await resp.aread()
                    raise error_from_response(resp)
                async for line in resp.aiter_lines():
                    if line.startswith("data:"):
                        yield EventPublic.model_validate(json.loads(line[5:].strip()))
        except httpx.HTTPError as exc:
            raise transport_error(exc, self.base_url) from None

    # --- clients ----------------------------------------------------------------------------------

    async def models(self) -> list[dict[str, Any]]:
        data = await self.request("GET", "/v1/models", role="client")
        return list(data.get("data", []))

    async def chat(self, body: dict[str, Any]) -> dict[str, Any]:
        data: dict[str, Any] = await self.request(
            "POST", "/v1/chat/completions", role="client", json_body={**body, "stream": False}
        )
        return data

    async def chat_stream(self, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Yield the chunks of a streamed chat completion; a final SSE ``error`` raises."""
        try:
            async with self._http.stream(
                "POST",
                self.base_url + "/v1/chat/completions",
                json={**body, "stream": True},
                headers=self._auth("client"),
                timeout=httpx.Timeout(None, connect=10.0),
            ) as resp:
                if resp.status_code >= 400:
                    await resp.aread()
                    raise error_from_response(resp)
                event = "message"
                async for line in resp.aiter_lines():
                    if line.startswith("event:"):
                        event = line[6:].strip()
                    elif line.startswith("data:"):
                        payload = line[5:].strip()
                        if payload == "[DONE]":
                            return
                        try:
                            chunk = json.loads(payload)
                        except ValueError:
                            raise RmaError(
                                "bad_response", f"the stream sent non-JSON: {payload[:200]}"
                            ) from None
                        if not isinstance(chunk, dict):
                            raise RmaError("bad_response", f"unexpected chunk: {payload[:200]}")
                        if event == "error" or "error" in chunk:
                            err = chunk.get("error", chunk)
                            raise RmaError(
                                str(err.get("code", "stream_error")), str(err.get("message", err))
                            )
                        yield chunk
                    elif not line:
                        event = "message"
        except httpx.HTTPError as exc:
            raise transport_error(exc, self.base_url) from None
