"""Where checkpoints live: a local folder or an S3 prefix, behind one small interface.

S3 uses boto3 with the standard AWS credential chain (never printed) and `S3_ENDPOINT_URL` for
S3-compatible stores. Every call retries transient errors and throttling with exponential backoff; a
store that stays unreachable raises StoreUnavailable after the retries, and callers decide what that
means (training keeps its local checkpoints and catches up later).
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)


class StoreUnavailable(RuntimeError):
    """The remote store could not be reached after all retries."""


_LOCAL_ERRORS = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)


def is_remote(path: str | None) -> bool:
    return bool(path) and str(path).startswith("s3://")


def split_s3(url: str) -> tuple[str, str]:
    if not url.startswith("s3://") or len(url) <= 5:
        raise ValueError(f"expected an s3://bucket/prefix URL, got {url!r}")
    bucket, _, prefix = url[5:].partition("/")
    return bucket, prefix.strip("/")


@dataclass
class Retry:
    attempts: int = 6
    base_delay: float = 0.5
    max_delay: float = 20.0


class S3Store:
    """Objects under s3://bucket/prefix; keys passed to methods are relative to the prefix."""

    def __init__(self, url: str, retry: Retry | None = None, timeout: float = 30.0):
        import boto3
        from botocore.config import Config

        self.url = url.rstrip("/")
        self.bucket, self.prefix = split_s3(url)
        self.retry = retry or Retry()
        config = Config(connect_timeout=timeout, read_timeout=timeout, retries={"max_attempts": 1})
        self.client = boto3.client("s3", endpoint_url=os.environ.get("S3_ENDPOINT_URL") or None, config=config)

    def _key(self, rel: str) -> str:
        return f"{self.prefix}/{rel}" if self.prefix else rel

    def _call(self, what: str, fn, *args, **kwargs):
        from boto3.exceptions import S3UploadFailedError
        from botocore.exceptions import BotoCoreError, ClientError

        delay = self.retry.base_delay
        for attempt in range(1, self.retry.attempts + 1):
            try:
                return fn(*args, **kwargs)
            except _LOCAL_ERRORS:
                raise  # the local file, not the store: retrying cannot help
            except (ClientError, BotoCoreError, OSError, S3UploadFailedError) as err:
                # upload_file wraps the client's error (throttling included) in S3UploadFailedError.
                cause = err.__context__ if isinstance(err, S3UploadFailedError) and err.__context__ else err
                if isinstance(cause, ClientError):
                    code = cause.response.get("Error", {}).get("Code", "")
                    status = cause.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
                    if code in ("NoSuchKey", "404", "NoSuchBucket", "AccessDenied", "403") or status in (403, 404):
                        raise
                    reason = f"{code or status}"
                else:
                    reason = type(cause).__name__
            if attempt == self.retry.attempts:
                raise StoreUnavailable(f"{what} on {self.url} failed after {attempt} attempts ({reason})")
            log.warning("%s on %s failed (%s); retry %d/%d in %.1fs", what, self.url, reason, attempt,
                        self.retry.attempts - 1, delay)
            time.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, self.retry.max_delay)

    def upload(self, local: str | Path, rel: str) -> None:
        self._call(f"upload {rel}", self.client.upload_file, str(local), self.bucket, self._key(rel))

    def download(self, rel: str, local: str | Path) -> None:
        Path(local).parent.mkdir(parents=True, exist_ok=True)
        tmp = f"{local}.part"
        self._call(f"download {rel}", self.client.download_file, self.bucket, self._key(rel), tmp)
        os.replace(tmp, local)

    def read_text(self, rel: str) -> str | None:
        from botocore.exceptions import ClientError

        try:
            obj = self._call(f"read {rel}", self.client.get_object, Bucket=self.bucket, Key=self._key(rel))
        except ClientError:
            return None
        return obj["Body"].read().decode()

    def write_text(self, rel: str, text: str) -> None:
        self._call(f"write {rel}", self.client.put_object, Bucket=self.bucket, Key=self._key(rel),
                   Body=text.encode())

    def list_dirs(self, rel: str = "") -> list[str]:
        """Immediate sub-'folders' of rel."""
        prefix = self._key(rel).rstrip("/") + "/" if (self.prefix or rel) else ""
        out, token = [], None
        while True:
            kwargs = dict(Bucket=self.bucket, Prefix=prefix, Delimiter="/")
            if token:
                kwargs["ContinuationToken"] = token
            page = self._call(f"list {rel or '/'}", self.client.list_objects_v2, **kwargs)
            out += [p["Prefix"][len(prefix):].rstrip("/") for p in page.get("CommonPrefixes", [])]
            if not page.get("IsTruncated"):
                return out
            token = page["NextContinuationToken"]

    def list_files(self, rel: str) -> list[str]:
        """All keys below rel, relative to rel."""
        return list(self.file_sizes(rel))

    def file_sizes(self, rel: str) -> dict[str, int]:
        """Size in bytes of every object below rel, by its key relative to rel."""
        prefix = self._key(rel).rstrip("/") + "/"
        out, token = {}, None
        while True:
            kwargs = dict(Bucket=self.bucket, Prefix=prefix)
            if token:
                kwargs["ContinuationToken"] = token
            page = self._call(f"list {rel}", self.client.list_objects_v2, **kwargs)
            out.update((o["Key"][len(prefix):], int(o["Size"])) for o in page.get("Contents", []))
            if not page.get("IsTruncated"):
                return out
            token = page["NextContinuationToken"]

    def delete_dir(self, rel: str) -> None:
        keys = [f"{rel}/{k}" for k in self.list_files(rel)]
        for i in range(0, len(keys), 1000):
            objects = [{"Key": self._key(k)} for k in keys[i:i + 1000]]
            self._call(f"delete {rel}", self.client.delete_objects, Bucket=self.bucket,
                       Delete={"Objects": objects, "Quiet": True})


class LocalStore:
    """The same interface over a local folder (a shared file system counts as local)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.url = str(self.root)

    def upload(self, local: str | Path, rel: str) -> None:
        dst = self.root / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(dst.name + ".part")
        shutil.copyfile(local, tmp)
        os.replace(tmp, dst)

    def download(self, rel: str, local: str | Path) -> None:
        Path(local).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.root / rel, local)

    def read_text(self, rel: str) -> str | None:
        p = self.root / rel
        return p.read_text() if p.is_file() else None

    def write_text(self, rel: str, text: str) -> None:
        p = self.root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(p.name + ".part")
        tmp.write_text(text)
        os.replace(tmp, p)

    def list_dirs(self, rel: str = "") -> list[str]:
        p = self.root / rel
        return sorted(d.name for d in p.iterdir() if d.is_dir()) if p.is_dir() else []

    def list_files(self, rel: str) -> list[str]:
        return sorted(self.file_sizes(rel))

    def file_sizes(self, rel: str) -> dict[str, int]:
        p = self.root / rel
        return {str(f.relative_to(p)): f.stat().st_size for f in p.rglob("*") if f.is_file()} if p.is_dir() else {}

    def delete_dir(self, rel: str) -> None:
        shutil.rmtree(self.root / rel, ignore_errors=True)


def open_store(url: str) -> S3Store | LocalStore:
    return S3Store(url) if is_remote(url) else LocalStore(url)
