"""An S3 prefix (AWS or an S3-compatible store) with the store interface, and the one boto3 client factory.

Credentials come from the standard AWS chain (environment, ~/.aws/, instance roles) and are never read,
logged or printed here. The endpoint of an S3-compatible store is `S3_ENDPOINT_URL` (the variable Streaming
reads too), else boto3's own `AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL`.

Retries are botocore's own (https://boto3.amazonaws.com/v1/documentation/api/latest/guide/retries.html):
mode `standard` with 8 attempts in all by default (exponential backoff with jitter, capped at 20 s; retries
connection errors, timeouts, throttling and 5xx), overridable with botocore's variables `AWS_RETRY_MODE`
(`standard` or `adaptive`, which also rate-limits the client) and `AWS_MAX_ATTEMPTS`. What still fails after
them is StoreUnavailable. Timeouts: `DIP_S3_CONNECT_TIMEOUT` (default 10 s) and `DIP_S3_READ_TIMEOUT` (60 s).

S3-compatible stores: boto3 >= 1.36 sends new default integrity checksums that several such stores reject
(e.g. MissingContentMD5 on DeleteObjects). With a custom endpoint, `s3_compatible_defaults()` sets botocore's
`AWS_REQUEST_CHECKSUM_CALCULATION` and `AWS_RESPONSE_CHECKSUM_VALIDATION` to `when_required` unless the user
set them (so Streaming's and Composer's own clients get the same), and our client is made with them. Even
then botocore gives the operations that must carry a checksum (DeleteObjects, which checkpoint retention
uses) a CRC32 header and no Content-MD5; with a custom endpoint our client sends Content-MD5 instead, as
S3 APIs before 2025 did (`DIP_S3_CONTENT_MD5=0` keeps botocore's CRC32).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from dip_scale.storage.errors import NotFound, StoreUnavailable
from dip_scale.storage.local import _is_temporary, _parse_json

ENDPOINT_ENV = "S3_ENDPOINT_URL"
DEFAULT_RETRY_MODE = "standard"
DEFAULT_MAX_ATTEMPTS = 8
_SINGLE_PUT_LIMIT = 1 << 27
"""Files up to this size go up in one PUT; boto3's managed transfer (threads, multipart) costs more for them."""
_MISSING = {"404", "NoSuchKey", "NotFound", "NoSuchBucket"}
_DENIED = {"403", "AccessDenied", "AllAccessDisabled", "InvalidAccessKeyId", "SignatureDoesNotMatch"}
_CHECKSUM_ENVS = ("AWS_REQUEST_CHECKSUM_CALCULATION", "AWS_RESPONSE_CHECKSUM_VALIDATION")


def split_s3(url: str) -> tuple[str, str]:
    """s3://bucket/prefix -> (bucket, prefix without slashes at either end)."""
    if not str(url).startswith("s3://"):
        raise ValueError(f"expected an s3://bucket/prefix URL, got {url!r}")
    bucket, _, prefix = str(url)[5:].partition("/")
    if not bucket:
        raise ValueError(f"no bucket in {url!r}: expected s3://bucket/prefix")
    return bucket, prefix.strip("/")


def endpoint_url() -> str | None:
    return os.environ.get(ENDPOINT_ENV) or None


def s3_compatible_defaults() -> None:
    """With a custom endpoint (an S3-compatible store), ask every S3 client of this process and its children
    (ours, Streaming's, Composer's) to send and check integrity checksums only where the API requires them.
    A value the user set is kept. Without a custom endpoint (AWS itself) nothing changes."""
    if endpoint_url():
        for name in _CHECKSUM_ENVS:
            os.environ.setdefault(name, "when_required")


def s3_client() -> Any:
    """The boto3 S3 client for the current endpoint and settings (one per process and settings: clients are
    thread-safe, and building one costs tens of milliseconds)."""
    s3_compatible_defaults()
    return _client(endpoint_url(), os.environ.get("AWS_RETRY_MODE", DEFAULT_RETRY_MODE),
                   os.environ.get("DIP_S3_CONTENT_MD5", "1"),
                   int(os.environ.get("AWS_MAX_ATTEMPTS", DEFAULT_MAX_ATTEMPTS)),
                   float(os.environ.get("DIP_S3_CONNECT_TIMEOUT", 10)),
                   float(os.environ.get("DIP_S3_READ_TIMEOUT", 60)),
                   tuple(os.environ.get(name) for name in _CHECKSUM_ENVS))


@functools.lru_cache(maxsize=16)
def _client(endpoint: str | None, mode: str, md5: str, attempts: int, connect_timeout: float,
            read_timeout: float, checksums: tuple) -> Any:
    import boto3
    from botocore.config import Config

    options: dict[str, Any] = {}
    if checksums[0]:
        options["request_checksum_calculation"] = checksums[0]
    if checksums[1]:
        options["response_checksum_validation"] = checksums[1]
    config = Config(retries={"mode": mode, "total_max_attempts": attempts}, connect_timeout=connect_timeout,
                    read_timeout=read_timeout, **options)
    client = boto3.session.Session().client("s3", endpoint_url=endpoint, config=config)
    if endpoint and md5 != "0":
        client.meta.events.register("before-sign.s3.DeleteObjects", _content_md5_instead_of_crc32)
    return client


def _content_md5_instead_of_crc32(request, **_) -> None:
    """Before signing a DeleteObjects request: the Content-MD5 header S3-compatible stores require, in place of
    the CRC32 checksum headers botocore adds."""
    body = request.body if isinstance(request.body, bytes) else (request.body or b"")
    if isinstance(body, str):
        body = body.encode()
    for name in [h for h in request.headers if h.lower().startswith(("x-amz-checksum-", "x-amz-sdk-checksum"))]:
        del request.headers[name]
    request.headers["Content-MD5"] = base64.b64encode(hashlib.md5(body).digest()).decode()


def _translate(err: Exception, what: str, url: str) -> Exception:
    """A boto3/botocore error -> NotFound, PermissionError or StoreUnavailable (the error itself otherwise)."""
    from boto3.exceptions import S3UploadFailedError
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError, PartialCredentialsError

    cause = err.__context__ if isinstance(err, S3UploadFailedError) and err.__context__ is not None else err
    if isinstance(cause, ClientError):
        code = str(cause.response.get("Error", {}).get("Code", ""))
        status = cause.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        if code in _MISSING or status == 404:
            bucket = " (no such bucket)" if code == "NoSuchBucket" else ""
            return NotFound(f"no such object: {url}{bucket}")
        if code in _DENIED or status == 403:
            return PermissionError(f"{what} {url}: access denied ({code or status}); check the credentials and "
                                   "the bucket policy")
        if status >= 500 or code in ("SlowDown", "Throttling", "RequestTimeout", "InternalError", "ServiceUnavailable"):
            return StoreUnavailable(f"{what} {url} failed after retries ({code or status})")
        return err
    if isinstance(cause, (NoCredentialsError, PartialCredentialsError)):
        return PermissionError(f"{what} {url}: no AWS credentials found ({cause}); set AWS_PROFILE or "
                               "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, or use an instance role")
    if isinstance(cause, (BotoCoreError, ConnectionError, TimeoutError)):
        return StoreUnavailable(f"{what} {url} failed after retries ({type(cause).__name__}: {cause})")
    return err


class S3Store:
    """Objects under s3://bucket/prefix; names passed to methods are relative, '/'-separated."""

    def __init__(self, url: str):
        self.bucket, self.prefix = split_s3(url)
        self.url = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        self.client = s3_client()

    def __repr__(self) -> str:
        return f"S3Store({self.url!r})"

    def url_of(self, name: str) -> str:
        return f"{self.url}/{name}" if name else self.url

    def child(self, name: str) -> S3Store:
        return S3Store(self.url_of(name))

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def _call(self, what: str, name: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as err:  # noqa: BLE001  (translated, or re-raised as it was)
            translated = _translate(err, what, self.url_of(name))
            if translated is err:
                raise
            raise translated from err

    # -- reading ------------------------------------------------------------------------------------

    def exists(self, name: str) -> bool:
        try:
            self._call("head", name, self.client.head_object, Bucket=self.bucket, Key=self._key(name))
        except NotFound:
            return False
        return True

    def read_bytes(self, name: str) -> bytes:
        def get():
            return self.client.get_object(Bucket=self.bucket, Key=self._key(name))["Body"].read()

        return self._call("read", name, get)

    def read_text(self, name: str) -> str:
        return self.read_bytes(name).decode()

    def read_json(self, name: str) -> Any:
        return _parse_json(self.read_bytes(name), self.url_of(name))

    def download(self, name: str, local: str | Path) -> None:
        """Copy object `name` to the local path `local` (atomically)."""
        local = Path(local)
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.with_name(f".{local.name}.tmp-{os.getpid()}")
        try:
            self._call("download", name, self.client.download_file, self.bucket, self._key(name), str(tmp))
            os.replace(tmp, local)
        finally:
            tmp.unlink(missing_ok=True)

    def _pages(self, name: str, **kwargs):
        token = None
        while True:
            extra = {"ContinuationToken": token} if token else {}
            page = self._call("list", name, self.client.list_objects_v2, Bucket=self.bucket, **kwargs, **extra)
            yield page
            if not page.get("IsTruncated"):
                return
            token = page["NextContinuationToken"]

    def list(self, prefix: str = "") -> list[str]:
        """Names of all objects whose name starts with `prefix` (a string prefix), sorted."""
        strip = len(self.prefix) + 1 if self.prefix else 0
        key_prefix = self._key(prefix) if prefix else (self.prefix + "/" if self.prefix else "")
        names = [o["Key"][strip:] for page in self._pages(prefix, Prefix=key_prefix) for o in page.get("Contents", [])]
        return sorted(n for n in names if not _is_temporary(n))

    def list_dirs(self, name: str = "") -> list[str]:
        """Immediate sub-'folders' of folder `name`."""
        prefix = self._key(name).rstrip("/") + "/" if (self.prefix or name) else ""
        return sorted(p["Prefix"][len(prefix):].rstrip("/") for page in self._pages(name, Prefix=prefix, Delimiter="/")
                      for p in page.get("CommonPrefixes", []))

    def file_sizes(self, name: str) -> dict[str, int]:
        """Size of every object below folder `name`, by its name relative to that folder."""
        prefix = self._key(name).rstrip("/") + "/"
        return {o["Key"][len(prefix):]: int(o["Size"]) for page in self._pages(name, Prefix=prefix)
                for o in page.get("Contents", [])}

    def is_empty(self) -> bool:
        prefix = self.prefix + "/" if self.prefix else ""
        page = self._call("list", "", self.client.list_objects_v2, Bucket=self.bucket, Prefix=prefix, MaxKeys=1)
        return not page.get("Contents")

    # -- writing ------------------------------------------------------------------------------------

    def write_bytes(self, name: str, data: bytes) -> None:
        """One PUT: readers see the whole object or the previous one."""
        self._call("write", name, self.client.put_object, Bucket=self.bucket, Key=self._key(name), Body=data)

    def write_text(self, name: str, text: str) -> None:
        self.write_bytes(name, text.encode())

    def write_json(self, name: str, obj: Any) -> None:
        self.write_bytes(name, (json.dumps(obj, indent=1) + "\n").encode())

    def upload(self, local: str | Path, name: str) -> None:
        """Copy the local file `local` to object `name`."""
        if not Path(local).is_file():
            raise FileNotFoundError(f"no such local file: {local}")
        if os.path.getsize(local) <= _SINGLE_PUT_LIMIT:
            def put():
                with open(local, "rb") as f:
                    self.client.put_object(Bucket=self.bucket, Key=self._key(name), Body=f)

            self._call("upload", name, put)
        else:  # multipart, in parallel parts
            self._call("upload", name, self.client.upload_file, str(local), self.bucket, self._key(name))

    def delete_tree(self, name: str) -> None:
        """Remove every object below folder `name` (a missing folder is not an error)."""
        prefix = self._key(name).rstrip("/") + "/"
        keys = [o["Key"] for page in self._pages(name, Prefix=prefix) for o in page.get("Contents", [])]
        for start in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
            batch = [{"Key": key} for key in keys[start:start + 1000]]
            self._call("delete", name, self.client.delete_objects, Bucket=self.bucket,
                       Delete={"Objects": batch, "Quiet": True})


__all__ = ["S3Store", "endpoint_url", "s3_client", "s3_compatible_defaults", "split_s3"]
