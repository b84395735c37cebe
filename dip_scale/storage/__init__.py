"""Where files live: a local folder or an S3 prefix, behind one small interface that data, data_prep,
checkpoints and evaluation all use.

    store = open_store("s3://bucket/runs/dip-xl")      # or a local path
    store.write_json("eval/result.json", {...})        # atomic: readers see the old file or the new one
    store.read_text("latest")                          # NotFound (a FileNotFoundError) naming the URL
    store.upload("state.pt", "checkpoints/step-000005005/state.pt")

Errors are said one way each, whatever the backend:
- `NotFound` (a FileNotFoundError): no such file, object or bucket; the message names the URL.
- `PermissionError`: the credentials may not do this (S3 AccessDenied / 403); never reported as "missing".
- `StoreUnavailable`: the store stayed unreachable (connection refused or reset, timeouts, throttling,
  5xx) after botocore's own retries; the caller decides what that means (training keeps its checkpoints
  locally and retries; a start exits 75 to be requeued).
S3 settings (retry mode and attempts, timeouts, checksums for S3-compatible stores): see storage/s3.py.
"""

from __future__ import annotations

from dip_scale.storage.errors import NotFound, StoreUnavailable
from dip_scale.storage.local import LocalStore, atomic_write
from dip_scale.storage.s3 import S3Store, s3_client, s3_compatible_defaults, split_s3

Store = LocalStore | S3Store
"""What open_store returns: the same methods on both (read/write bytes, text and JSON, upload, download, list,
list_dirs, file_sizes, delete_tree, exists, is_empty, child, url_of)."""

REMOTE_SCHEMES = ("s3://",)


def is_remote(url: str | None) -> bool:
    """Whether `url` names an object store rather than a local (or shared) file system path."""
    return bool(url) and str(url).startswith(REMOTE_SCHEMES)


def open_store(url: str) -> Store:
    """The store for a local folder or an s3://bucket/prefix URL."""
    if not url:
        raise ValueError("empty location: expected a local folder or s3://bucket/prefix")
    scheme, sep, _ = str(url).partition("://")
    if sep and scheme != "s3":
        raise ValueError(f"unsupported URL scheme {scheme!r} in {url!r}: expected a local path or s3://bucket/prefix")
    return S3Store(url) if is_remote(url) else LocalStore(url)


def open_parent(url: str) -> tuple[Store, str]:
    """(the store of the folder holding `url`, the file's name in it), for a single file given by URL or path."""
    parent, _, name = str(url).rstrip("/").rpartition("/")
    if not name:
        raise ValueError(f"{url!r} does not name a file")
    return open_store(parent or "."), name


__all__ = ["LocalStore", "NotFound", "S3Store", "Store", "StoreUnavailable", "atomic_write", "is_remote", "open_parent",
           "open_store",
           "s3_client", "s3_compatible_defaults", "split_s3"]
