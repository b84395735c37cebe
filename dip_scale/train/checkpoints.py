"""Checkpoint layout, completeness, verification and the choice of where to resume.

A run's checkpoints live in `<root>/checkpoints/step-<step>/` (root: a local folder, and the same
layout under s3:// when the save folder is remote). Each holds Composer's checkpoint (`state.pt`, or
`sharded/` for FSDP and DeepSpeed) and, written last, `manifest.json` with the size and SHA-256 of every
file. A checkpoint without a manifest is incomplete and never loaded; `<root>/latest` names the newest
committed checkpoint (a hint: the manifests are the truth).

Resume picks the newest checkpoint that verifies (every file present with the right checksum), locally
or, failing that, in the remote store, and falls back to older ones with a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
import warnings
from pathlib import Path

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
LATEST = "latest"
CHECKPOINTS = "checkpoints"


def checkpoint_name(step: int) -> str:
    return f"step-{step:09d}"


def step_of(name: str) -> int | None:
    if name.startswith("step-") and name[5:].isdigit():
        return int(name[5:])
    return None


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def describe_files(folder: Path, names: list[str]) -> dict[str, dict]:
    return {n: {"size": (folder / n).stat().st_size, "sha256": sha256_file(folder / n)} for n in names}


def write_manifest(folder: Path, step: int, files: dict[str, dict], load: str, meta: dict) -> None:
    manifest = {"step": step, "load": load, "files": files, "time": time.time(), **meta}
    tmp = folder / (MANIFEST + ".part")
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    tmp.replace(folder / MANIFEST)


def verify_local(folder: Path) -> str | None:
    """None when the checkpoint folder is complete and intact, else the reason it is not."""
    mpath = folder / MANIFEST
    if not mpath.is_file():
        return "no manifest (incomplete checkpoint)"
    try:
        manifest = json.loads(mpath.read_text())
    except json.JSONDecodeError as err:
        return f"unreadable manifest ({err})"
    for name, info in manifest["files"].items():
        p = folder / name
        if not p.is_file():
            return f"missing file {name}"
        if p.stat().st_size != info["size"]:
            return f"{name} has {p.stat().st_size} bytes, manifest says {info['size']}"
        if sha256_file(p) != info["sha256"]:
            return f"checksum mismatch in {name}"
    return None


def load_target(folder: Path) -> str:
    """What to hand to Composer's load_path: the state file or the sharded folder."""
    manifest = json.loads((folder / MANIFEST).read_text())
    return str(folder / manifest["load"])


def local_checkpoints(root: Path) -> list[tuple[int, Path]]:
    base = root / CHECKPOINTS
    if not base.is_dir():
        return []
    found = [(step_of(d.name), d) for d in base.iterdir() if d.is_dir()]
    return sorted(((s, d) for s, d in found if s is not None), key=lambda x: x[0], reverse=True)


def _download(store, name: str, dest: Path) -> str | None:
    """Fetch a remote checkpoint into dest and verify it; None on success, else the reason."""
    text = store.read_text(f"{CHECKPOINTS}/{name}/{MANIFEST}")
    if text is None:
        return "no manifest in the remote store (incomplete upload)"
    manifest = json.loads(text)
    tmp = dest.with_name(dest.name + ".download")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for rel in manifest["files"]:
            store.download(f"{CHECKPOINTS}/{name}/{rel}", tmp / rel)
    except Exception as err:  # a missing object or an unreachable store: try an older checkpoint
        shutil.rmtree(tmp, ignore_errors=True)
        return f"download failed ({err})"
    (tmp / MANIFEST).write_text(text)
    reason = verify_local(tmp)
    if reason:
        shutil.rmtree(tmp, ignore_errors=True)
        return reason
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return None


def find_resume_checkpoint(local_root: Path, store=None) -> tuple[int, str] | None:
    """(step, load path) of the newest intact checkpoint, downloading it when only the store has it.

    Broken candidates are skipped with a warning naming what is wrong; None means start fresh."""
    local = dict(local_checkpoints(local_root))
    remote: dict[int, str] = {}
    if store is not None:
        try:
            for name in store.list_dirs(CHECKPOINTS):
                if (s := step_of(name)) is not None:
                    remote[s] = name
        except Exception as err:
            warnings.warn(f"cannot list checkpoints in {store.url} ({err}); resuming from local checkpoints only")
    for step in sorted(set(local) | set(remote), reverse=True):
        if step in local:
            reason = verify_local(local[step])
            if reason is None:
                return step, load_target(local[step])
            warnings.warn(f"skipping local checkpoint {local[step]}: {reason}")
        if step in remote:
            dest = local_root / CHECKPOINTS / remote[step]
            reason = _download(store, remote[step], dest)
            if reason is None:
                return step, load_target(dest)
            warnings.warn(f"skipping remote checkpoint {store.url}/{CHECKPOINTS}/{remote[step]}: {reason}")
    return None
