"""AWS Signature V4 against AWS's published examples (the expected signatures are AWS's)."""

from __future__ import annotations

from datetime import UTC, datetime

from rma.coordinator.s3.sigv4 import EMPTY_SHA256, authorization, canonical_request


def test_aws_sig_v4_test_suite_get_vanilla() -> None:
    """The aws-sig-v4-test-suite's ``get-vanilla``: ``GET /`` with host and x-amz-date."""
    headers = {"Host": "example.amazonaws.com", "X-Amz-Date": "20150830T123600Z"}
    request, signed = canonical_request("GET", "/", [], headers, EMPTY_SHA256)
    assert request == (
        "GET\n/\n\nhost:example.amazonaws.com\nx-amz-date:20150830T123600Z\n\n"
        "host;x-amz-date\n"
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    )
    assert authorization(
        method="GET",
        path="/",
        params=[],
        headers=headers,
        payload_sha256=EMPTY_SHA256,
        access_key="AKIDEXAMPLE",
        secret_key="wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
        region="us-east-1",
        service="service",
        when=datetime(2015, 8, 30, 12, 36, tzinfo=UTC),
    ) == (
        "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, "
        "SignedHeaders=host;x-amz-date, "
        "Signature=5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31"
    )


def test_s3_docs_get_object_example() -> None:
    """The S3 API reference's "Example: GET Object" (header-based auth, a Range header)."""
    assert authorization(
        method="GET",
        path="/test.txt",
        params=[],
        headers={
            "host": "examplebucket.s3.amazonaws.com",
            "range": "bytes=0-9",
            "x-amz-content-sha256": EMPTY_SHA256,
            "x-amz-date": "20130524T000000Z",
        },
        payload_sha256=EMPTY_SHA256,
        access_key="AKIAIOSFODNN7EXAMPLE",
        secret_key="wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        region="us-east-1",
        service="s3",
        when=datetime(2013, 5, 24, tzinfo=UTC),
    ) == (
        "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request, "
        "SignedHeaders=host;range;x-amz-content-sha256;x-amz-date, "
        "Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41"
    )


def test_s3_docs_list_objects_example() -> None:
    """The S3 reference's "Example: ListObjects" (a query string: max-keys, prefix)."""
    assert authorization(
        method="GET",
        path="/",
        params=[("max-keys", "2"), ("prefix", "J")],
        headers={
            "host": "examplebucket.s3.amazonaws.com",
            "x-amz-content-sha256": EMPTY_SHA256,
            "x-amz-date": "20130524T000000Z",
        },
        payload_sha256=EMPTY_SHA256,
        access_key="AKIAIOSFODNN7EXAMPLE",
        secret_key="wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        region="us-east-1",
        service="s3",
        when=datetime(2013, 5, 24, tzinfo=UTC),
    ).endswith("Signature=34b48302e7b5fa45bde8084f4b7868a86f0a534bc59db6670ed5711ef69dc6f7")
