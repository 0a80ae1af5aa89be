"""rma's S3 client against a real S3-compatible server (moto's, signatures checked): objects
put in one PUT and in parts, streamed back, listed, deleted; clear errors that never show the
secret; a failed upload leaves nothing."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from tests.moto_s3 import MotoS3, moto_s3

from rma.coordinator.s3.client import MIN_PART_SIZE, S3Error


@pytest.fixture
def s3(tmp_path: Path) -> Iterator[MotoS3]:
    with moto_s3(tmp_path / "moto") as server:
        yield server


async def chunks(data: bytes, size: int = 200_000) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


async def read(body: AsyncIterator[bytes]) -> bytes:
    return b"".join([c async for c in body])


async def test_objects_small_and_in_parts(s3: MotoS3) -> None:
    client = s3.client()
    try:
        await client.put("rma/redis/1.bak", chunks(b"snapshot"), MIN_PART_SIZE)
        big = hashlib.sha256(b"seed").digest() * (11 * 1024 * 1024 // 32 + 3)  # 3 parts
        await client.put("rma/postgres/2.bak", chunks(big), MIN_PART_SIZE)

        length, body = await client.get("rma/postgres/2.bak")
        assert length == len(big)
        assert await read(body) == big
        listed = dict(await client.list("rma/"))
        assert listed == {"rma/redis/1.bak": 8, "rma/postgres/2.bak": len(big)}

        boto = s3.boto()  # seen without rma's code: a multipart upload, completed
        try:
            head = boto.head_object(Bucket=s3.bucket, Key="rma/postgres/2.bak")
            assert head["ContentLength"] == len(big)
            assert head["ETag"].strip('"').endswith("-3")
            assert boto.list_multipart_uploads(Bucket=s3.bucket).get("Uploads", []) == []
        finally:
            boto.close()

        await client.delete("rma/redis/1.bak")
        assert [k for k, _ in await client.list("rma/")] == ["rma/postgres/2.bak"]
        with pytest.raises(S3Error) as missing:
            await client.get("rma/redis/1.bak")
        assert missing.value.code == "NoSuchKey"
    finally:
        await client.aclose()


async def test_a_broken_upload_leaves_nothing(s3: MotoS3) -> None:
    client = s3.client()

    async def breaks() -> AsyncIterator[bytes]:
        yield b"x" * (MIN_PART_SIZE + 10)  # one part sent, then the upload breaks off
        raise OSError("the agent went away")

    try:
        with pytest.raises(OSError, match="went away"):
            await client.put("rma/redis/broken.bak", breaks(), MIN_PART_SIZE)
        assert await client.list("rma/") == []
        boto = s3.boto()
        try:  # the multipart upload was aborted: no parts kept in the bucket either
            assert boto.list_multipart_uploads(Bucket=s3.bucket).get("Uploads", []) == []
        finally:
            boto.close()
    finally:
        await client.aclose()


async def test_clear_errors_without_the_secret(s3: MotoS3) -> None:
    cases = [
        ({"secret_key": "not-the-secret-42"}, "SignatureDoesNotMatch"),
        ({"access_key": "AKIANOSUCHKEY"}, "InvalidAccessKeyId"),
        ({"bucket": "no-such-bucket"}, "NoSuchBucket"),
        ({"url": "http://127.0.0.1:9"}, "unreachable"),
    ]
    for overrides, expected in cases:
        client = s3.client(**overrides)
        try:
            with pytest.raises(S3Error) as err:
                await client.put("rma/x.bak", chunks(b"data"), MIN_PART_SIZE)
        finally:
            await client.aclose()
        message = str(err.value)
        assert expected in message, message
        assert s3.bucket in message or "no-such-bucket" in message
        assert s3.secret_key not in message and "not-the-secret-42" not in message
        assert "S3 bucket" in message and "127.0.0.1" in message


async def test_a_big_upload_holds_about_two_parts(s3: MotoS3) -> None:
    """64 MiB in 5 MiB parts: what this process allocates at its peak stays near two parts (the
    parts are let go of as they are sent, not kept alive until the garbage collector runs:
    before, 55 MiB)."""
    import tracemalloc

    async def fresh(total: int) -> AsyncIterator[bytes]:
        block = bytes(64 * 1024)
        for i in range(total // len(block)):
            yield i.to_bytes(8, "big") + block[8:]  # a new object each time, as from a socket

    client = s3.client()
    tracemalloc.start()
    try:
        await client.put("rma/big.bak", fresh(64 * 1024 * 1024), MIN_PART_SIZE)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        await client.aclose()
    assert peak < 3 * MIN_PART_SIZE, f"{peak / 2**20:.1f} MiB at the peak"


async def test_virtual_hosted_addressing_puts_the_bucket_in_the_host() -> None:
    """(moto's server needs DNS for bucket.host names, which this machine lacks: the request
    is checked as it would be sent.)"""
    from rma.coordinator.s3.client import S3Client, S3Config

    cfg = S3Config("https://s3.example.test:9000", "bkt", "AK", "SK", addressing="virtual")
    client = S3Client(cfg)
    try:
        req = client._request("GET", "rma/redis/1.bak")
        assert str(req.url) == "https://bkt.s3.example.test:9000/rma/redis/1.bak"
        assert req.headers["host"] == "bkt.s3.example.test:9000"
        assert "SignedHeaders=host;x-amz-content-sha256;x-amz-date" in req.headers["authorization"]
        listing = client._request("GET", None, [("list-type", "2"), ("prefix", "rma/")])
        assert str(listing.url) == "https://bkt.s3.example.test:9000/?list-type=2&prefix=rma%2F"
    finally:
        await client.aclose()
