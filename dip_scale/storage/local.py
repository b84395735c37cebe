"""A local folder (a shared file system counts as local) with the store interface, and the one helper that
writes a local file atomically."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from dip_scale.storage.errors import NotFound


def atomic_write(path: str | Path, data: bytes | str) -> Path:
    """Write a whole file so that readers see either the old content or the new, never a part.

    The data goes to a temporary name in the same folder, is flushed to disk, then renamed over the target
    (a rename within one file system is atomic; the fsync keeps a power loss from leaving a renamed but
    empty file). Permissions follow the umask, so a shared dataset or run folder stays readable to others."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def copy_atomic(src: Path, dst: Path) -> None:
    """Copy a file so that readers of `dst` see the old file or the whole new one."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class LocalStore:
    """Files under a local folder; names passed to methods are relative, '/'-separated."""

    def __init__(self, root: str | Path):
        # Absolute, so that worker processes with another working directory agree on it.
        self.root = Path(os.path.abspath(os.path.expanduser(str(root))))
        self.url = str(self.root)

    def __repr__(self) -> str:
        return f"LocalStore({self.url!r})"

    def url_of(self, name: str) -> str:
        return f"{self.url}/{name}" if name else self.url

    def child(self, name: str) -> LocalStore:
        return LocalStore(self.path(name))

    def path(self, name: str) -> Path:
        return self.root.joinpath(*name.split("/")) if name else self.root

    # -- reading ------------------------------------------------------------------------------------

    def exists(self, name: str) -> bool:
        return self.path(name).is_file()

    def read_bytes(self, name: str) -> bytes:
        try:
            return self.path(name).read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            raise NotFound(f"no such file: {self.url_of(name)}") from None
        except IsADirectoryError:
            raise NotFound(f"{self.url_of(name)} is a folder, not a file") from None

    def read_text(self, name: str) -> str:
        return self.read_bytes(name).decode()

    def read_json(self, name: str) -> Any:
        return _parse_json(self.read_bytes(name), self.url_of(name))

    def download(self, name: str, local: str | Path) -> None:
        """Copy file `name` to the local path `local` (atomically)."""
        src = self.path(name)
        if not src.is_file():
            raise NotFound(f"no such file: {self.url_of(name)}")
        copy_atomic(src, Path(local))

    def list(self, prefix: str = "") -> list[str]:
        """Names of all files whose name starts with `prefix` (a string prefix, as in S3), sorted."""
        base = self.path(prefix.rpartition("/")[0])
        if not base.is_dir():
            return []
        names = [p.relative_to(self.root).as_posix() for p in base.rglob("*") if p.is_file()]
        return sorted(n for n in names if n.startswith(prefix) and not _is_temporary(n))

    def list_dirs(self, name: str = "") -> list[str]:
        """Immediate sub-folders of folder `name`."""
        p = self.path(name)
        return sorted(d.name for d in p.iterdir() if d.is_dir()) if p.is_dir() else []

    def file_sizes(self, name: str) -> dict[str, int]:
        """Size of every file below folder `name`, by its name relative to that folder."""
        p = self.path(name)
        if not p.is_dir():
            return {}
        return {f.relative_to(p).as_posix(): f.stat().st_size for f in p.rglob("*")
                if f.is_file() and not _is_temporary(f.name)}

    def is_empty(self) -> bool:
        return not self.list()

    # -- writing ------------------------------------------------------------------------------------

    def write_bytes(self, name: str, data: bytes) -> None:
        atomic_write(self.path(name), data)

    def write_text(self, name: str, text: str) -> None:
        atomic_write(self.path(name), text)

    def write_json(self, name: str, obj: Any) -> None:
        self.write_bytes(name, (json.dumps(obj, indent=1) + "\n").encode())

    def upload(self, local: str | Path, name: str) -> None:
        """Copy the local file `local` to `name` (atomically)."""
        copy_atomic(Path(local), self.path(name))

    def delete_tree(self, name: str) -> None:
        """Remove folder `name` and everything below it (a missing folder is not an error)."""
        shutil.rmtree(self.path(name), ignore_errors=True)


def _is_temporary(name: str) -> bool:
    base = name.rpartition("/")[2]
    return base.startswith(".") and ".tmp-" in base


def _parse_json(data: bytes, where: str) -> Any:
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{where} is not valid JSON: {err}") from None
