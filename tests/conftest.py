"""Fixtures shared by the whole test suite. Keep this file to fixtures that several packages use.

s3_server (session scope)
    A real S3-speaking HTTP server (moto's ThreadedMotoServer) on 127.0.0.1 at a free port, started
    once per test session. While it runs, the environment of this process, and so of every subprocess a
    test starts (DataLoader workers, Composer's uploader, CLI runs), points S3 clients at it:
        S3_ENDPOINT_URL      read by Streaming, Composer and dip_scale.storage
        AWS_ENDPOINT_URL_S3  read by boto3 itself, for any other client
        AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY   dummy values; AWS_DEFAULT_REGION=us-east-1
        NO_PROXY             loopback never goes through a proxy
    It yields an S3Server:
        s3_server.endpoint_url          "http://127.0.0.1:<port>"
        s3_server.bucket                a bucket created for the session ("dip-test")
        s3_server.url("a/b")            "s3://dip-test/a/b"
        s3_server.fresh_url("ckpt")     "s3://dip-test/ckpt-<8 hex>": a prefix no other test uses
        s3_server.create_bucket("name") creates another bucket (idempotent), returns its name
        s3_server.client()              a boto3 S3 client for the server
        s3_server.list_keys(url)        keys under an s3:// URL, sorted
    Objects persist for the session: give each test its own prefix (fresh_url) instead of cleaning up.
    Example:
        def test_upload(s3_server):
            out = s3_server.fresh_url("ckpt")
            ...  # anything that writes to `out`
            assert s3_server.list_keys(out)

s3_url (function scope)
    `s3_server.fresh_url(<test name>)`: a unique, empty s3:// prefix for one test.

tiny_shards (session scope)
    256 synthetic 32x32 images as local MDS shards: the tiny recipes' data.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

_DUMMY_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "dip-test-key", "AWS_SECRET_ACCESS_KEY": "dip-test-secret"}


@dataclass(frozen=True)
class S3Server:
    endpoint_url: str
    bucket: str

    def client(self) -> Any:
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint_url, region_name="us-east-1",
                            aws_access_key_id=_DUMMY_CREDENTIALS["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=_DUMMY_CREDENTIALS["AWS_SECRET_ACCESS_KEY"])

    def create_bucket(self, name: str) -> str:
        """Create bucket `name` (3 to 63 characters; moto rejects shorter names) if it does not exist."""
        client = self.client()
        existing = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
        if name not in existing:
            client.create_bucket(Bucket=name)
        return name

    def url(self, prefix: str = "") -> str:
        return f"s3://{self.bucket}/{prefix}".rstrip("/")

    def fresh_url(self, label: str = "test") -> str:
        safe = re.sub(r"[^A-Za-z0-9._-]+", "-", label).strip("-")[:60] or "test"
        return self.url(f"{safe}-{uuid.uuid4().hex[:8]}")

    def list_keys(self, url: str) -> list[str]:
        bucket, _, prefix = url.removeprefix("s3://").partition("/")
        keys: list[str] = []
        for page in self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            keys += [obj["Key"] for obj in page.get("Contents", [])]
        return sorted(keys)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("S3_ENDPOINT_URL", endpoint)
        patch.setenv("AWS_ENDPOINT_URL_S3", endpoint)
        for name, value in _DUMMY_CREDENTIALS.items():
            patch.setenv(name, value)
        patch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        patch.delenv("AWS_PROFILE", raising=False)
        patch.delenv("AWS_SESSION_TOKEN", raising=False)
        patch.setenv("NO_PROXY", ",".join(filter(None, ["127.0.0.1", "localhost", os.environ.get("NO_PROXY", "")])))
        s3 = S3Server(endpoint_url=endpoint, bucket="dip-test")
        s3.create_bucket(s3.bucket)
        try:
            yield s3
        finally:
            server.stop()


@pytest.fixture
def s3_url(s3_server: S3Server, request: pytest.FixtureRequest) -> str:
    return s3_server.fresh_url(request.node.name)


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory) -> str:
    """256 synthetic 32x32 images as local MDS shards (the tiny recipes' data)."""
    from data_prep.synthetic import write_synthetic_shards

    out = tmp_path_factory.mktemp("data") / "synthetic-32"
    write_synthetic_shards(str(out), num_images=256, resolution=32, seed=0)
    return str(out)
