"""A small S3 client for the backup store: objects put (one PUT, or a multipart upload for
big ones), streamed back, deleted and listed; each request signed with AWS Signature V4.

Works with AWS S3, MinIO, Ceph RGW and other S3-compatible stores (path-style addressing by
default, virtual-hosted on request).  Nothing here logs or repeats the secret key: errors name
the endpoint, the bucket and what the store answered.
"""

from __future__ import annotations

import contextlib
import hashlib
import html
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import httpx

from rma.coordinator.s3.sigv4 import authorization, canonical_query, uri_encode

#: S3's smallest part but the last, and its most parts per upload.
MIN_PART_SIZE = 5 * 1024 * 1024
MAX_PARTS = 10_000
_ERROR_BODY_BYTES = 64 * 1024


class S3Error(Exception):
    """A request the store refused or could not be sent; ``code`` is S3's (``NoSuchKey``...)."""

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.code = code


@dataclass(frozen=True)
class S3Config:
    url: str
    bucket: str
    access_key: str
    secret_key: str = field(repr=False)
    region: str = "us-east-1"
    addressing: Literal["path", "virtual"] = "path"
    timeout: float = 60.0
    ca_file: Path | None = None


def _tag(xml: str, name: str) -> str | None:
    m = re.search(rf"<{name}>(.*?)</{name}>", xml, re.DOTALL)
    return html.unescape(m.group(1)) if m else None


class _Once:
    """A request body that lets go of its bytes once sent: httpx's response and its stream
    refer to each other (freed only by the garbage collector), and would keep every part of a
    multipart upload alive until then."""

    def __init__(self, chunks: list[bytes]) -> None:
        self._chunks = chunks

    async def __aiter__(self) -> AsyncIterator[bytes]:
        chunks, self._chunks = self._chunks, []
        while chunks:
            yield chunks.pop(0)


class S3Client:
    def __init__(self, cfg: S3Config, *, transport: httpx.AsyncBaseTransport | None = None):
        self.cfg = cfg
        endpoint = httpx.URL(cfg.url)
        if endpoint.scheme not in ("http", "https") or not endpoint.host:
            raise ValueError(f"backup S3 URL {cfg.url!r} is not http(s)://host[:port]")
        self._scheme = endpoint.scheme
        port = f":{endpoint.port}" if endpoint.port is not None else ""
        self._netloc = f"{endpoint.host}{port}"
        verify: str | bool = str(cfg.ca_file) if cfg.ca_file else True
        self._http = httpx.AsyncClient(
            timeout=httpx.Timeout(cfg.timeout, connect=min(cfg.timeout, 10.0)),
            verify=verify,
            transport=transport,
            trust_env=False,
        )

    def describe(self) -> str:
        return f"S3 bucket {self.cfg.bucket!r} at {self.cfg.url}"

    async def aclose(self) -> None:
        await self._http.aclose()

    # -- requests -------------------------------------------------------------------------

    def _request(
        self,
        method: str,
        key: str | None,
        params: list[tuple[str, str]] | None = None,
        body: bytes | list[bytes] = b"",
        headers: dict[str, str] | None = None,
    ) -> httpx.Request:
        """A signed request; ``body`` as one bytes or a list of chunks (sent one by one and let
        go of as they are: the list is emptied)."""
        params = params or []
        chunks = [body] if isinstance(body, bytes) else body
        chunks = [c for c in chunks if c]
        if self.cfg.addressing == "virtual":
            host, path = f"{self.cfg.bucket}.{self._netloc}", f"/{key or ''}"
        else:
            host, path = self._netloc, f"/{self.cfg.bucket}" + (f"/{key}" if key else "")
        sha = hashlib.sha256()
        for chunk in chunks:
            sha.update(chunk)
        digest = sha.hexdigest()
        now = datetime.now(UTC)
        signed = {
            "host": host,
            "x-amz-content-sha256": digest,  # S3 checks the body against it
            "x-amz-date": now.strftime("%Y%m%dT%H%M%SZ"),
            **(headers or {}),
        }
        signed["authorization"] = authorization(
            method=method,
            path=path,
            params=params,
            headers=signed,
            payload_sha256=digest,
            access_key=self.cfg.access_key,
            secret_key=self.cfg.secret_key,
            region=self.cfg.region,
            service="s3",
            when=now,
        )
        query = canonical_query(params)
        url = f"{self._scheme}://{host}{uri_encode(path, keep_slash=True)}"
        if chunks:
            signed["content-length"] = str(sum(len(c) for c in chunks))
        return self._http.build_request(
            method,
            url + (f"?{query}" if query else ""),
            content=_Once(chunks) if chunks else None,
            headers=signed,
        )

    async def _send(self, request: httpx.Request, *, stream: bool = False) -> httpx.Response:
        try:
            resp = await self._http.send(request, stream=stream)
        except httpx.HTTPError as exc:
            why = str(exc) or type(exc).__name__
            raise S3Error(f"{self.describe()} is unreachable: {why}") from None
        if resp.status_code >= 300:
            raw = b""
            async for chunk in resp.aiter_bytes():
                raw += chunk
                if len(raw) > _ERROR_BODY_BYTES:
                    break
            await resp.aclose()
            text = raw.decode(errors="replace")
            code, message = _tag(text, "Code"), _tag(text, "Message")
            said = f"{code}: {message}" if code else (message or resp.reason_phrase)
            raise S3Error(
                f"{self.describe()} answered {resp.status_code} ({said})",
                status=resp.status_code,
                code=code,
            )
        return resp

    # -- objects --------------------------------------------------------------------------

    async def put(self, key: str, chunks: AsyncIterator[bytes], part_size: int) -> int:
        """Store what ``chunks`` yields at ``key``: one PUT when it fits in ``part_size``,
        else a multipart upload with at most one part (``part_size``, as the chunks came) held
        here at a time.
        An error (from the store or from ``chunks``) aborts the upload: nothing is left."""
        buf: list[bytes] = []
        held = 0
        total = 0
        upload_id: str | None = None
        parts: list[tuple[int, str]] = []
        try:
            async for chunk in chunks:
                total += len(chunk)
                while chunk:
                    take = chunk[: part_size - held]
                    chunk = chunk[len(take) :]
                    buf.append(take)
                    held += len(take)
                    if held < part_size:
                        continue
                    if upload_id is None:
                        upload_id = await self._initiate(key)
                    part, buf, held = buf, [], 0  # sent and let go of chunk by chunk
                    parts.append(await self._put_part(key, upload_id, len(parts) + 1, part))
            if upload_id is None:
                await self._send(self._request("PUT", key, body=buf))
                return total
            if buf:
                parts.append(await self._put_part(key, upload_id, len(parts) + 1, buf))
            await self._complete(key, upload_id, parts)
            upload_id = None
            return total
        finally:
            if upload_id is not None:
                # if this fails too, the bucket's lifecycle rule for incomplete uploads cleans up
                with contextlib.suppress(S3Error):
                    await self._send(self._request("DELETE", key, [("uploadId", upload_id)]))

    async def _initiate(self, key: str) -> str:
        resp = await self._send(self._request("POST", key, [("uploads", "")]))
        upload_id = _tag(resp.text, "UploadId")
        if not upload_id:
            raise S3Error(f"{self.describe()} started no multipart upload: {resp.text[:200]!r}")
        return upload_id

    async def _put_part(
        self, key: str, upload_id: str, number: int, data: list[bytes]
    ) -> tuple[int, str]:
        if number > MAX_PARTS:
            raise S3Error(f"{self.describe()}: more than {MAX_PARTS} parts (raise the part size)")
        params = [("partNumber", str(number)), ("uploadId", upload_id)]
        resp = await self._send(self._request("PUT", key, params, body=data))
        return number, resp.headers.get("etag", "")

    async def _complete(self, key: str, upload_id: str, parts: list[tuple[int, str]]) -> None:
        body = "".join(
            f"<Part><PartNumber>{n}</PartNumber><ETag>{html.escape(etag)}</ETag></Part>"
            for n, etag in parts
        )
        xml = f"<CompleteMultipartUpload>{body}</CompleteMultipartUpload>".encode()
        resp = await self._send(self._request("POST", key, [("uploadId", upload_id)], body=xml))
        if "<Error>" in resp.text:  # S3 may answer 200 and fail in the body
            code, message = _tag(resp.text, "Code"), _tag(resp.text, "Message")
            raise S3Error(f"{self.describe()} did not complete the upload ({code}: {message})")

    async def get(self, key: str) -> tuple[int | None, AsyncIterator[bytes]]:
        """The object's length (when told) and its bytes, streamed; :class:`S3Error` (code
        ``NoSuchKey`` when it is not there) before any byte."""
        resp = await self._send(self._request("GET", key), stream=True)
        length = resp.headers.get("content-length")

        async def body() -> AsyncIterator[bytes]:
            try:
                async for chunk in resp.aiter_bytes():
                    yield chunk
            except httpx.HTTPError as exc:
                raise S3Error(f"{self.describe()}: reading {key!r} broke off: {exc}") from None
            finally:
                await resp.aclose()

        return (int(length) if length and length.isdigit() else None), body()

    async def delete(self, key: str) -> None:
        await self._send(self._request("DELETE", key))

    async def list(self, prefix: str = "", *, limit: int | None = None) -> list[tuple[str, int]]:
        """``(key, size)`` of the objects under ``prefix`` (ListObjectsV2, every page)."""
        out: list[tuple[str, int]] = []
        token: str | None = None
        while True:
            params = [("list-type", "2"), ("prefix", prefix)]
            if limit is not None:
                params.append(("max-keys", str(limit)))
            if token:
                params.append(("continuation-token", token))
            text = (await self._send(self._request("GET", None, params))).text
            for item in re.findall(r"<Contents>(.*?)</Contents>", text, re.DOTALL):
                size = _tag(item, "Size") or "0"
                out.append((_tag(item, "Key") or "", int(size) if size.isdigit() else 0))
            token = _tag(text, "NextContinuationToken")
            if limit is not None or _tag(text, "IsTruncated") != "true" or not token:
                return out
