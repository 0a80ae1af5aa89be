"""moto's standalone server as a real S3-compatible endpoint for the backup-store tests.

``moto_s3()`` starts ``python -m moto.server`` on a free 127.0.0.1 port with authentication on
(``INITIAL_NO_AUTH_ACTION_COUNT``): the first few calls make an IAM user with an access key and
the bucket, and every request after them must carry a valid Signature V4 of that key.  Tests
skip, naming moto, when ``moto[server]`` is not installed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

BUCKET = "rma-backups"
#: IAM calls (create user, access key, policy) and the bucket made before auth is enforced.
_UNAUTHENTICATED = 4


def policy(effect: str) -> str:
    """An IAM policy document: every action allowed (or denied: the bucket refuses)."""
    statements = [
        {"Effect": effect, "Action": "s3:*", "Resource": "*"},
        {"Effect": "Allow", "Action": "iam:*", "Resource": "*"},
    ]
    return json.dumps({"Version": "2012-10-17", "Statement": statements})


@dataclass
class MotoS3:
    url: str
    bucket: str
    access_key: str
    secret_key: str
    proc: subprocess.Popen[bytes]

    def env(self, **extra: str) -> dict[str, str]:
        """The coordinator's settings for this bucket (RMA_BACKUP_S3_*)."""
        return {
            "RMA_BACKUP_S3_URL": self.url,
            "RMA_BACKUP_S3_BUCKET": self.bucket,
            "RMA_BACKUP_S3_ACCESS_KEY": self.access_key,
            "RMA_BACKUP_S3_SECRET_KEY": self.secret_key,
            **extra,
        }

    def boto(self, service: str = "s3") -> Any:
        """A boto3 client with the IAM user's key: checks made without rma's own S3 code."""
        import boto3

        return boto3.client(
            service,
            endpoint_url=self.url,
            region_name="us-east-1",
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
        )

    def refuse(self, refused: bool = True) -> None:
        """The bucket refuses (AccessDenied) every request of the key, or takes them again."""
        iam = self.boto("iam")
        try:
            iam.put_user_policy(
                UserName="rma",
                PolicyName="backups",
                PolicyDocument=policy("Deny" if refused else "Allow"),
            )
        finally:
            iam.close()

    def client(self, **overrides: object):  # type: ignore[no-untyped-def]
        from rma.coordinator.s3.client import S3Client, S3Config

        values: dict[str, object] = {
            "url": self.url,
            "bucket": self.bucket,
            "access_key": self.access_key,
            "secret_key": self.secret_key,
            **overrides,
        }
        return S3Client(S3Config(**values))  # type: ignore[arg-type]


def need_moto() -> None:
    if importlib.util.find_spec("moto") is None or importlib.util.find_spec("flask") is None:
        pytest.skip("needs moto's S3 server: pip install 'moto[server]' (the dev extra)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def moto_s3(log_dir: Path) -> Iterator[MotoS3]:
    need_moto()
    import boto3  # moto's own dependency: only the setup below, never rma, uses it

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "INITIAL_NO_AUTH_ACTION_COUNT": str(_UNAUTHENTICATED),
        "AWS_ACCESS_KEY_ID": "setup",
        "AWS_SECRET_ACCESS_KEY": "setup",
    }
    log_dir.mkdir(parents=True, exist_ok=True)
    with open(log_dir / "moto.log", "ab") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            env=env,
            stdout=fh,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"moto exited: {(log_dir / 'moto.log').read_text()[-2000:]}")
            try:
                httpx.get(url + "/moto-api/", timeout=1)
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline:
                    raise RuntimeError("moto's server did not start") from None
                time.sleep(0.1)
        common = {
            "endpoint_url": url,
            "region_name": "us-east-1",
            "aws_access_key_id": "setup",
            "aws_secret_access_key": "setup",
        }
        iam = boto3.client("iam", **common)
        iam.create_user(UserName="rma")
        made = iam.create_access_key(UserName="rma")["AccessKey"]
        iam.put_user_policy(
            UserName="rma",
            PolicyName="backups",
            PolicyDocument=policy("Allow"),
        )
        boto3.client("s3", **common).create_bucket(Bucket=BUCKET)
        iam.close()
        yield MotoS3(url, BUCKET, made["AccessKeyId"], made["SecretAccessKey"], proc)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
