"""Uploading checkpoints to a remote save folder, in the order that keeps the remote copy consistent:
every file of a checkpoint first, then its manifest (only once every file is there with its size), then
`latest`, then retention. One background thread per rank; the training loop never waits for the store.

An unreachable store (StoreUnavailable) is retried without end, loudly, while training goes on with its
local checkpoints; any other failure (a local file gone, access denied) skips that item with an error, so
that one bad checkpoint cannot hold back the later ones.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from pathlib import Path

from dip_scale.checkpoint.layout import (
    CHECKPOINTS,
    LATEST,
    MANIFEST,
    checkpoint_name,
    read_manifest,
    step_of,
    verify_local,
)
from dip_scale.storage import StoreUnavailable

log = logging.getLogger(__name__)


class Uploader:
    """This rank's uploads, in order, on a background thread."""

    def __init__(self, store, retry_pause: float = 10.0):
        self.store = store
        self.retry_pause = retry_pause
        self.queue: queue.Queue = queue.Queue()
        self.uploaded_step = -1
        """Newest step whose files from this rank are all up."""
        self.unavailable = False
        self.pinned: set[int] = set()
        """Local checkpoints being caught up: retention must not delete them."""
        self.thread = threading.Thread(target=self._run, name="checkpoint-upload", daemon=True)
        self.thread.start()

    def files(self, step: int, folder: Path, names: list[str]) -> None:
        """Queue this rank's files of checkpoint `step` (names relative to its local folder)."""
        self.queue.put(("files", step, (folder, names)))

    def commit(self, step: int, manifest: str, keep_last: int, milestones: set[int]) -> None:
        """Queue the commit of `step`, given its manifest's text (the local folder may be pruned before)."""
        self.queue.put(("commit", step, (manifest, keep_last, milestones)))

    def catch_up(self, steps: list[tuple[int, Path]], keep_last: int, milestones: set[int]) -> None:
        """Queue the upload of complete local checkpoints newer than the newest complete remote one."""
        self.pinned.update(s for s, _ in steps)
        self.queue.put(("catch_up", -1, (steps, keep_last, milestones)))

    def idle(self) -> bool:
        return self.queue.unfinished_tasks == 0

    def _run(self) -> None:
        while True:
            kind, step, args = self.queue.get()
            while True:
                try:
                    getattr(self, f"_{kind}")(step, *args)
                except StoreUnavailable as err:
                    if not self.unavailable:
                        log.error("CHECKPOINT STORE UNREACHABLE (%s): training continues, checkpoints are kept "
                                  "locally and will be uploaded when the store is back", err)
                    self.unavailable = True
                    time.sleep(self.retry_pause)
                    continue
                except Exception as err:  # noqa: BLE001  (a dead uploader would fail silently)
                    log.error("CHECKPOINT UPLOAD FAILED, skipped: %s of step %d (%s: %s)", kind, step,
                              type(err).__name__, err)
                    if kind == "files":
                        self.uploaded_step = step  # its commit will find the files missing and not happen
                if self.unavailable:
                    log.warning("checkpoint store %s is reachable again; uploading what was kept locally",
                                self.store.url)
                self.unavailable = False
                break
            self.queue.task_done()

    def _files(self, step: int, folder: Path, names: list[str]) -> None:
        for rel in names:
            self.store.upload(folder / rel, f"{CHECKPOINTS}/{checkpoint_name(step)}/{rel}")
        self.uploaded_step = step

    def _commit(self, step: int, manifest: str, keep_last: int, milestones: set[int]) -> None:
        """Upload the manifest, which makes the remote checkpoint complete, once every file it names is there
        with its size; then `latest`; then retention."""
        name = checkpoint_name(step)
        sizes = self.store.file_sizes(f"{CHECKPOINTS}/{name}")
        wrong = [rel for rel, info in json.loads(manifest)["files"].items() if sizes.get(rel) != info["size"]]
        if wrong:
            raise RuntimeError(f"{self.store.url_of(f'{CHECKPOINTS}/{name}')} lacks {wrong}; not marking it complete")
        self.store.write_text(f"{CHECKPOINTS}/{name}/{MANIFEST}", manifest)
        self.store.write_text(LATEST, name)
        log.info("checkpoint uploaded: %s", self.store.url_of(f"{CHECKPOINTS}/{name}"))
        # Retention over the complete checkpoints up to this one; incomplete ones below it are leftovers.
        steps = sorted(s for d in self.store.list_dirs(CHECKPOINTS) if (s := step_of(d)) is not None and s <= step)
        complete = [s for s in steps if s == step or self._complete(s)]
        for s in steps:
            if s not in milestones and s not in complete[-keep_last:]:
                self.store.delete_tree(f"{CHECKPOINTS}/{checkpoint_name(s)}")

    def _complete(self, step: int) -> bool:
        return self.store.exists(f"{CHECKPOINTS}/{checkpoint_name(step)}/{MANIFEST}")

    def _catch_up(self, _, steps: list[tuple[int, Path]], keep_last: int, milestones: set[int]) -> None:
        """Upload complete local checkpoints newer than the newest complete remote one, oldest first."""
        try:
            remote = [s for d in self.store.list_dirs(CHECKPOINTS) if (s := step_of(d)) is not None]
            newest = max((s for s in remote if self._complete(s)), default=-1)
            for step, folder in sorted(steps):
                if step > newest and verify_local(folder) is None:
                    log.warning("uploading checkpoint %s, which an earlier process could not upload", folder)
                    self._files(step, folder, list(read_manifest(folder)["files"]))
                    self._commit(step, (folder / MANIFEST).read_text(), keep_last, milestones)
                self.pinned.discard(step)
        except StoreUnavailable:
            raise  # retried: the steps stay pinned
        except Exception:
            self.pinned.clear()
            raise
