"""Checkpoint layout, completeness, verification and the choice of where to resume.

A run's checkpoints live in `<root>/checkpoints/step-<step>/` (root: a local folder, and the same
layout under s3:// when the save folder is remote). Each holds Composer's checkpoint (`state.pt`, or
`sharded/` for FSDP; under DeepSpeed `state.pt` without weights plus the engine's `deepspeed/`) and,
written last, `manifest.json` with the size and SHA-256 of every file. A checkpoint without a manifest is
incomplete and never loaded; `<root>/latest` names the newest committed checkpoint (a hint: the manifests
are the truth).

Resume picks the newest checkpoint that verifies (every file present with the right checksum), locally
or, failing that, in the remote store, and falls back to older ones with a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from pathlib import Path

from dip_scale.train.storage import StoreUnavailable

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


def read_manifest(folder: Path) -> dict:
    return json.loads((folder / MANIFEST).read_text())


def _check_manifest(manifest) -> str | None:
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict) or "load" not in manifest:
        return "malformed manifest"
    return None


def verify_local(folder: Path) -> str | None:
    """None when the checkpoint folder is complete and intact, else the reason it is not."""
    mpath = folder / MANIFEST
    if not mpath.is_file():
        return "no manifest (incomplete checkpoint)"
    try:
        manifest = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        return f"unreadable manifest ({err})"
    if reason := _check_manifest(manifest):
        return reason
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
    return str(folder / read_manifest(folder)["load"])


def local_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every step-N folder, complete or not, newest first."""
    base = root / CHECKPOINTS
    if not base.is_dir():
        return []
    found = [(step_of(d.name), d) for d in base.iterdir() if d.is_dir()]
    return sorted(((s, d) for s, d in found if s is not None), key=lambda x: x[0], reverse=True)


def _download(store, name: str, dest: Path) -> str | None:
    """Fetch a remote checkpoint into dest and verify it; None on success, else the reason."""
    tmp = dest.with_name(dest.name + ".download")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        text = store.read_text(f"{CHECKPOINTS}/{name}/{MANIFEST}")
        if text is None:
            return "no manifest in the remote store (incomplete upload)"
        try:
            manifest = json.loads(text)
        except json.JSONDecodeError as err:
            return f"unreadable manifest ({err})"
        if reason := _check_manifest(manifest):
            return reason
        for rel in manifest["files"]:
            store.download(f"{CHECKPOINTS}/{name}/{rel}", tmp / rel)
    except StoreUnavailable:
        shutil.rmtree(tmp, ignore_errors=True)
        raise  # says nothing about this checkpoint: an older one would be no better a choice
    except Exception as err:  # a missing object: try an older checkpoint
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


def resume_candidates(local_root: Path, store=None) -> list[int]:
    """Steps that may be resumed from, newest first: local step-N folders and remote ones (unverified).

    A store that cannot be listed raises StoreUnavailable unless an intact local checkpoint exists: the run
    must not start from scratch because the store was briefly unreachable."""
    local = local_checkpoints(local_root)
    steps = {s for s, _ in local}
    names = {checkpoint_name(s) for s in steps}
    if store is not None:
        try:
            remote = [n for n in store.list_dirs(CHECKPOINTS) if step_of(n) is not None]
        except Exception as err:
            if not any(verify_local(folder) is None for _, folder in local):
                raise StoreUnavailable(f"cannot list the checkpoints in {store.url} ({err}) and there is no intact "
                                       f"local checkpoint in {local_root}: not starting the run from scratch; run "
                                       "again when the store is reachable") from err
            log.warning("cannot list the checkpoints in %s (%s); resuming from local checkpoints only", store.url, err)
        else:
            steps |= {step_of(n) for n in remote}
            names |= set(remote)
            try:
                _check_latest(store.read_text(LATEST), names, f"{store.url}/{LATEST}")
            except Exception:  # noqa: BLE001  (a hint; the listing above is what counts)
                pass
    if store is None:
        latest = local_root / LATEST
        _check_latest(latest.read_text() if latest.is_file() else None, names, str(latest))
    return sorted(steps, reverse=True)


def _check_latest(name: str | None, existing: set[str], where: str) -> None:
    """`latest` is only a hint (the manifests decide); say so when it names a checkpoint that is gone."""
    if name is not None and name.strip() not in existing:
        log.warning("%s names %s, which does not exist; resuming from the newest intact checkpoint instead",
                    where, name.strip())


def fetch_checkpoint(local_root: Path, store, step: int) -> str | None:
    """The load path of checkpoint `step` once it is intact under local_root (verified there, or downloaded
    and verified); None, with a warning naming what is wrong, when neither copy is intact."""
    folder = local_root / CHECKPOINTS / checkpoint_name(step)
    if folder.is_dir():
        reason = verify_local(folder)
        if reason is None:
            return load_target(folder)
        log.warning("skipping local checkpoint %s: %s", folder, reason)
    if store is not None:
        reason = _download(store, checkpoint_name(step), folder)
        if reason is None:
            log.info("downloaded checkpoint %s/%s/%s into %s", store.url, CHECKPOINTS, checkpoint_name(step), folder)
            return load_target(folder)
        log.warning("skipping remote checkpoint %s/%s/%s: %s", store.url, CHECKPOINTS, checkpoint_name(step), reason)
    return None


def find_resume_checkpoint(local_root: Path, store=None) -> tuple[int, str] | None:
    """(step, load path) of the newest intact checkpoint, downloading it when only the store has it.

    Broken candidates are skipped with a warning naming what is wrong; None means start fresh."""
    for step in resume_candidates(local_root, store):
        if (path := fetch_checkpoint(local_root, store, step)) is not None:
            return step, path
    return None
