"""A folder addressed by URL, local (`/data/imagenet256`) or in S3 (`s3://bucket/prefix`), for small files.

The dataset writer, `dip-prep merge/verify` and `read_dataset_info` all need the same handful of
operations on a dataset folder wherever it lives; shards themselves move through Streaming's own
uploader and downloader. S3 is reached through boto3 with the standard AWS credential chain (environment,
config files, instance roles) and the endpoint in `S3_ENDPOINT_URL` (as Streaming reads it) for
S3-compatible stores. Credentials are never read, logged or printed here; error messages name the URL.

    folder = Folder("s3://bucket/imagenet256")
    info = folder.read_json("dataset.json")
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import uuid
from typing import Any
from urllib.parse import urlparse

S3_ENDPOINT_ENV = "S3_ENDPOINT_URL"
_SINGLE_PUT_LIMIT = 1 << 27
"""Files up to this size go up in one PUT; boto3's managed transfer (threads, multipart) costs more for them."""


@functools.lru_cache(maxsize=8)
def _s3_client(endpoint_url: str | None) -> Any:
    """One boto3 client per endpoint per process (clients are thread-safe; sessions are not)."""
    import boto3
    from botocore.config import Config

    session = boto3.session.Session()
    return session.client("s3", endpoint_url=endpoint_url,
                          config=Config(retries={"max_attempts": 8, "mode": "standard"}))


def s3_client() -> Any:
    """The boto3 S3 client for the endpoint currently in `S3_ENDPOINT_URL` (AWS itself when unset)."""
    return _s3_client(os.environ.get(S3_ENDPOINT_ENV) or None)


def is_s3_url(url: str) -> bool:
    return url.startswith("s3://")


class Folder:
    """A local directory or an S3 prefix; names passed to methods are relative, '/'-separated."""

    def __init__(self, url: str) -> None:
        if not url:
            raise ValueError("empty folder URL")
        parsed = urlparse(url)
        if parsed.scheme not in ("", "s3"):
            raise ValueError(f"unsupported URL scheme {parsed.scheme!r} in {url!r}: expected a local path or s3://")
        self.url = url.rstrip("/")
        self.is_s3 = parsed.scheme == "s3"
        if self.is_s3:
            if not parsed.netloc:
                raise ValueError(f"no bucket in {url!r}: expected s3://bucket/prefix")
            self.bucket = parsed.netloc
            self.prefix = parsed.path.strip("/")
        else:
            # Absolute, so that worker processes with another working directory agree on it.
            self.path = os.path.abspath(os.path.expanduser(url))
            self.url = self.path

    def __repr__(self) -> str:
        return f"Folder({self.url!r})"

    def child(self, name: str) -> Folder:
        return Folder(self.url_of(name))

    def url_of(self, name: str) -> str:
        return f"{self.url}/{name}" if name else self.url

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def _local(self, name: str) -> str:
        return os.path.join(self.path, *name.split("/")) if name else self.path

    # -- reading ------------------------------------------------------------------------------------

    def exists(self, name: str) -> bool:
        if not self.is_s3:
            return os.path.exists(self._local(name))
        from botocore.exceptions import ClientError

        try:
            s3_client().head_object(Bucket=self.bucket, Key=self._key(name))
            return True
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise

    def read_bytes(self, name: str) -> bytes:
        if not self.is_s3:
            try:
                with open(self._local(name), "rb") as file:
                    return file.read()
            except FileNotFoundError:
                raise FileNotFoundError(f"no such file: {self.url_of(name)}") from None
        from botocore.exceptions import ClientError

        try:
            return s3_client().get_object(Bucket=self.bucket, Key=self._key(name))["Body"].read()
        except ClientError as error:
            code = error.response.get("Error", {}).get("Code")
            if code in ("404", "NoSuchKey", "NotFound"):
                raise FileNotFoundError(f"no such object: {self.url_of(name)}") from None
            if code == "NoSuchBucket":
                raise FileNotFoundError(f"no such bucket {self.bucket!r} (for {self.url_of(name)})") from None
            raise

    def read_json(self, name: str) -> Any:
        data = self.read_bytes(name)
        try:
            return json.loads(data)
        except json.JSONDecodeError as error:
            raise ValueError(f"{self.url_of(name)} is not valid JSON: {error}") from None

    def list(self, prefix: str = "") -> list[str]:
        """Names (relative to this folder) of all files whose name starts with `prefix`, sorted.

        As in S3, `prefix` is a string prefix: "part-" matches "part-00000/index.json".
        """
        if not self.is_s3:
            root = self._local(prefix.rpartition("/")[0])
            names = []
            for directory, _, files in os.walk(root):
                relative = os.path.relpath(directory, self.path).replace(os.sep, "/")
                names += [f if relative == "." else f"{relative}/{f}" for f in files]
            return sorted(name for name in names if name.startswith(prefix))
        key_prefix = self._key(prefix)
        strip = len(self.prefix) + 1 if self.prefix else 0
        names = []
        paginator = s3_client().get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=key_prefix):
            names += [obj["Key"][strip:] for obj in page.get("Contents", [])]
        return sorted(names)

    def is_empty(self) -> bool:
        """Whether the folder holds no file at all (a missing folder is empty)."""
        if not self.is_s3:
            return not any(files for _, _, files in os.walk(self.path))
        response = s3_client().list_objects_v2(Bucket=self.bucket, Prefix=self._key(""), MaxKeys=1)
        return not response.get("Contents")

    def download(self, name: str, destination: str) -> None:
        """Copy file `name` to the local path `destination`."""
        if not self.is_s3:
            shutil.copyfile(self._local(name), destination)
            return
        from botocore.exceptions import ClientError

        try:
            s3_client().download_file(self.bucket, self._key(name), destination)
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                raise FileNotFoundError(f"no such object: {self.url_of(name)}") from None
            raise

    # -- writing ------------------------------------------------------------------------------------

    def write_bytes(self, name: str, data: bytes) -> None:
        """Write a whole file; readers never see a partial one (local: rename, S3: single PUT)."""
        if self.is_s3:
            s3_client().put_object(Bucket=self.bucket, Key=self._key(name), Body=data)
            return
        path = self._local(name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        # Not mkstemp: its 0600 mode would make shared datasets unreadable to others; open() honours umask.
        temporary = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            with open(temporary, "wb") as file:
                file.write(data)
                file.flush()
                os.fsync(file.fileno())  # the rename must not land before the data (power loss)
            os.replace(temporary, path)
        except BaseException:
            if os.path.exists(temporary):
                os.unlink(temporary)
            raise

    def upload(self, source: str, name: str) -> None:
        """Copy the local file `source` to `name`."""
        if self.is_s3:
            if os.path.getsize(source) <= _SINGLE_PUT_LIMIT:
                with open(source, "rb") as file:
                    s3_client().put_object(Bucket=self.bucket, Key=self._key(name), Body=file)
            else:
                s3_client().upload_file(source, self.bucket, self._key(name))
            return
        path = self._local(name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        temporary = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        shutil.copyfile(source, temporary)
        os.replace(temporary, path)

    def write_json(self, name: str, obj: Any) -> None:
        self.write_bytes(name, (json.dumps(obj, indent=1) + "\n").encode())

    def delete_tree(self, prefix: str) -> None:
        """Remove everything under `prefix/` (a missing prefix is not an error)."""
        if not self.is_s3:
            shutil.rmtree(self._local(prefix), ignore_errors=True)
            return
        keys = [self._key(name) for name in self.list(prefix + "/")]
        for start in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
            batch = [{"Key": key} for key in keys[start:start + 1000]]
            s3_client().delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
