"""Finding a checkpoint to resume from or to load: the newest one that verifies, locally or in the remote
store, fetched and verified before anyone loads it; older ones when the newest is broken (with a warning
naming what is wrong)."""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

from dip_scale.checkpoint.layout import (
    CHECKPOINTS,
    LATEST,
    MANIFEST,
    checkpoint_name,
    load_target,
    local_checkpoints,
    parse_manifest,
    step_of,
    verify_local,
)
from dip_scale.storage import NotFound, StoreUnavailable, is_remote, open_store

log = logging.getLogger(__name__)


def _download(checkpoint, dest: Path) -> str | None:
    """Fetch the remote checkpoint folder `checkpoint` (a store) into dest and verify it; None on success, else
    the reason it is unusable. StoreUnavailable and PermissionError propagate: they say nothing about it."""
    tmp = dest.with_name(dest.name + ".download")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        try:
            text = checkpoint.read_text(MANIFEST)
        except NotFound:
            return "no manifest in the remote store (incomplete upload)"
        manifest, reason = parse_manifest(text)
        if manifest is None:
            return reason
        for rel in manifest["files"]:
            try:
                checkpoint.download(rel, tmp / rel)
            except NotFound as err:
                return f"download failed ({err})"
        (tmp / MANIFEST).write_text(text)
        reason = verify_local(tmp)
        if reason:
            return reason
        shutil.rmtree(dest, ignore_errors=True)
        tmp.rename(dest)
        return None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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
        except StoreUnavailable as err:
            if not any(verify_local(folder) is None for _, folder in local):
                raise StoreUnavailable(f"cannot list the checkpoints in {store.url} ({err}) and there is no intact "
                                       f"local checkpoint in {local_root}: not starting the run from scratch; run "
                                       "again when the store is reachable") from err
            log.warning("cannot list the checkpoints in %s (%s); resuming from local checkpoints only", store.url, err)
        else:
            steps |= {step_of(n) for n in remote}
            names |= set(remote)
            try:
                _check_latest(store.read_text(LATEST), names, store.url_of(LATEST))
            except (NotFound, StoreUnavailable):  # a hint only: the listing above is what counts
                pass
    else:
        latest = Path(local_root) / LATEST
        if latest.is_file():
            _check_latest(latest.read_text(), names, str(latest))
    return sorted(steps, reverse=True)


def _check_latest(name: str, existing: set[str], where: str) -> None:
    """`latest` is only a hint (the manifests decide); say so when it names a checkpoint that is gone."""
    if name.strip() not in existing:
        log.warning("%s names %s, which does not exist; resuming from the newest intact checkpoint instead",
                    where, name.strip())


def fetch_checkpoint(local_root: Path, store, step: int) -> str | None:
    """The load path of checkpoint `step` once it is intact under local_root (verified there, or downloaded
    and verified); None, with a warning naming what is wrong, when neither copy is intact."""
    folder = Path(local_root) / CHECKPOINTS / checkpoint_name(step)
    if folder.is_dir():
        reason = verify_local(folder)
        if reason is None:
            return load_target(folder)
        log.warning("skipping local checkpoint %s: %s", folder, reason)
    if store is not None:
        where = store.url_of(f"{CHECKPOINTS}/{checkpoint_name(step)}")
        log.info("downloading checkpoint %s", where)
        reason = _download(store.child(f"{CHECKPOINTS}/{checkpoint_name(step)}"), folder)
        if reason is None:
            log.info("downloaded checkpoint %s into %s", where, folder)
            return load_target(folder)
        log.warning("skipping remote checkpoint %s: %s", where, reason)
    return None


def find_resume_checkpoint(local_root: Path, store=None) -> tuple[int, str] | None:
    """(step, load path) of the newest intact checkpoint, downloading it when only the store has it.

    Broken candidates are skipped with a warning naming what is wrong; None means there is none."""
    for step in resume_candidates(local_root, store):
        if (path := fetch_checkpoint(local_root, store, step)) is not None:
            return step, path
    return None


def resolve_checkpoint(location: str, cache_dir: str | Path | None = None) -> Path:
    """A run folder, a step-N checkpoint folder, a file inside one (state.pt), or an s3:// URL of a run or
    checkpoint folder -> a local, verified checkpoint folder (one holding manifest.json).

    Raises NotFound when there is nothing there, ValueError when what is there is not intact."""
    if is_remote(location):
        cache = Path(cache_dir) if cache_dir else Path(tempfile.mkdtemp(prefix="dip-checkpoint-"))
        store = open_store(location)
        if store.exists(MANIFEST):  # one checkpoint folder
            dest = cache / CHECKPOINTS / location.rstrip("/").rsplit("/", 1)[-1]
            reason = _download(store, dest)
            if reason is not None:
                raise ValueError(f"checkpoint {location} is not intact: {reason}")
            return dest
        found = find_resume_checkpoint(cache, store)
        if found is None:
            raise NotFound(f"no intact checkpoint under {location} (looked for {CHECKPOINTS}/step-*/{MANIFEST})")
        return checkpoint_folder(found[1])
    path = Path(location)
    if not path.exists():
        raise NotFound(f"checkpoint not found: {location} (give a run folder, a step-N checkpoint folder, a file in "
                       "one, or an s3:// URL of one of these)")
    if path.is_file() or path.name in ("sharded", "deepspeed"):
        path = path.parent
    if (path / MANIFEST).is_file():
        reason = verify_local(path)
        if reason:
            raise ValueError(f"checkpoint {path} is not intact: {reason}")
        return path
    found = find_resume_checkpoint(path)
    if found is None:
        raise NotFound(f"{location} holds no intact checkpoint (looked for {CHECKPOINTS}/step-*/{MANIFEST})")
    return checkpoint_folder(found[1])


def checkpoint_folder(load_path: str) -> Path:
    """The step-N folder of a load target (its state.pt or its sharded/ folder)."""
    return Path(load_path).parent
