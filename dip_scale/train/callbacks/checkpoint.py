"""Periodic, atomic, verified checkpoints with background upload (the format: dip_scale.checkpoint).

Saving (every `every` steps, at the end of training, and on demand from the preemption and non-finite
callbacks):
  1. every rank writes its part into `step-N.tmp/` with the saver's writer (Composer's checkpoint writer,
     or under deepspeed the engine's, see train/deepspeed.py);
  2. the ranks exchange sizes and digests of what they wrote; rank 0 writes `manifest.json` last and
     renames the folder to `step-N/`: only then is the checkpoint complete locally (on a multi-node job
     whose local folders are not shared, every node does the same with its own part);
  3. with a remote save folder, each rank uploads its own files in a background thread, retrying with
     backoff while the store is unreachable (loudly, without stopping training); once all ranks agree
     their files are up, rank 0 uploads the manifest and then `latest`: only then is it complete remotely.
A start with a remote save folder also uploads the local checkpoints that a previous process saved but
could not upload (store down, grace period over), newest remote one first.
Retention keeps the newest `keep_last` checkpoints plus milestones, and never deletes a local checkpoint
that is not yet uploaded, nor one that an evaluation beside training still reads (hold / release).
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import torch
from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist
from composer.utils.checkpoint import save_checkpoint

from dip_scale.checkpoint import (
    CHECKPOINTS,
    LATEST,
    MANIFEST,
    RECIPE,
    Uploader,
    checkpoint_name,
    describe_files,
    local_checkpoints,
    step_of,
    write_manifest,
)
from dip_scale.storage import atomic_write

log = logging.getLogger(__name__)


class ComposerWriter:
    """Composer's checkpoint writer: `state.pt` from rank 0, or `sharded/` from every rank under FSDP."""

    def write(self, state: State, tmp: Path) -> tuple[list[str], str]:
        """Write into `tmp`; return the files this rank wrote (relative to tmp) and what load_path names."""
        rank = dist.get_global_rank()
        sharded = state.fsdp_sharded_state_dict_enabled
        # Composer names the shard files itself (sharded/ from parallel.FSDPConfig); it ends with a barrier.
        written = save_checkpoint(state, str(tmp / "state.pt"))
        mine = []
        if written is not None:
            mine = [str(Path(written).relative_to(tmp))]
            if sharded and rank == 0:
                mine.append("sharded/.metadata")
        return mine, "sharded" if sharded else "state.pt"


class CheckpointSaver(Callback):
    def __init__(self, local_root: str | Path, store=None, every: int = 5000, keep_last: int = 3,
                 milestones: list[int] | None = None, config_yaml: str = "", upload_timeout: float = 600.0,
                 writer=None):
        self.local_root = Path(local_root)
        self.writer = writer or ComposerWriter()  # what goes into a checkpoint (train/deepspeed.py has its own)
        self.store = store
        self.every = every
        self.keep_last = keep_last
        self.milestones = set(milestones or [])
        self.config_yaml = config_yaml
        self.upload_timeout = upload_timeout
        self.uploader: Uploader | None = None
        self.saved: list[int] = []  # steps saved by this process, in order
        self.agreed = -1  # newest step uploaded by every rank (identical on all ranks)
        self.last_saved_step = -1
        self.held: set[int] = set()  # steps that an evaluation process beside training reads

    # -- events -------------------------------------------------------------------------------------

    def fit_start(self, state: State, logger: Logger):
        self.start_uploads()

    def batch_end(self, state: State, logger: Logger):
        step = int(state.timestamp.batch)
        if step % self.every == 0:
            self.save(state)
        self.sync_uploads(state)

    def fit_end(self, state: State, logger: Logger):
        self.save(state)
        self.finish(state)

    # -- saving -------------------------------------------------------------------------------------

    def start_uploads(self):
        """Start this rank's uploader; rank 0 queues the local checkpoints an earlier process left unuploaded."""
        if self.store is None or self.uploader is not None:
            return
        self.uploader = Uploader(self.store)
        if dist.get_global_rank() == 0:
            self.uploader.catch_up(local_checkpoints(self.local_root), self.keep_last, self.milestones)

    def save(self, state: State) -> Path:
        """Write a complete local checkpoint of the current step (idempotent per step)."""
        step = int(state.timestamp.batch)
        final = self.local_root / CHECKPOINTS / checkpoint_name(step)
        if step == self.last_saved_step:
            return final
        tmp = final.with_name(final.name + ".tmp")
        rank = dist.get_global_rank()
        if dist.get_local_rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        dist.barrier()
        mine, load = self.writer.write(state, tmp)
        if rank == 0:
            (tmp / RECIPE).write_text(self.config_yaml)
            mine.append(RECIPE)
        files = {}
        for part in dist.all_gather_object(describe_files(tmp, mine)):
            files.update(part)
        meta = {"world_size": dist.get_world_size()}
        if rank == 0:
            self._complete(tmp, final, step, files, load, meta)
            if self.store is None:
                atomic_write(self.local_root / LATEST, final.name)
        dist.barrier()
        if dist.get_world_size() > dist.get_local_world_size():
            # Other nodes: when their local folder is their own, their part is still in step-N.tmp/.
            if dist.get_local_rank() == 0 and rank != 0 and tmp.is_dir():
                self._complete(tmp, final, step, files, load, meta)
            dist.barrier()
        self.saved.append(step)
        self.last_saved_step = step
        if self.uploader is not None:
            self.uploader.files(step, final, mine)
        else:
            self.agreed = step
        self._prune_local()
        log.info("checkpoint saved: %s", final)
        return final

    @staticmethod
    def _complete(tmp: Path, final: Path, step: int, files: dict, load: str, meta: dict):
        write_manifest(tmp, step, files, load=load, meta=meta)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)

    def sync_uploads(self, state: State):
        """Agree across ranks which checkpoints are fully uploaded, and let rank 0 commit them. Collective,
        but only while some saved checkpoint is not yet agreed (a condition identical on all ranks)."""
        if self.uploader is None or not any(s > self.agreed for s in self.saved):
            return
        done = torch.tensor([self.uploader.uploaded_step], dtype=torch.int64)
        done = state.device.tensor_to_device(done)
        dist.all_reduce(done, reduce_operation="MIN")
        upto = int(done.item())
        if upto <= self.agreed:
            return
        if dist.get_global_rank() == 0:
            for step in (s for s in self.saved if self.agreed < s <= upto):
                manifest = (self.local_root / CHECKPOINTS / checkpoint_name(step) / MANIFEST).read_text()
                self.uploader.commit(step, manifest, self.keep_last, self.milestones)
        self.agreed = upto
        self._prune_local()

    def finish(self, state: State, timeout: float | None = None):
        """Wait (up to the timeout) until every saved checkpoint is committed remotely."""
        if self.uploader is None:
            return
        deadline = time.monotonic() + (self.upload_timeout if timeout is None else timeout)
        while True:
            self.sync_uploads(state)
            # Done, or out of time: decided together, or a rank would wait alone in the next collective.
            flags = torch.tensor([int(self.agreed < self.last_saved_step or not self.uploader.idle()),
                                  int(time.monotonic() >= deadline)])
            flags = state.device.tensor_to_device(flags)
            dist.all_reduce(flags, reduce_operation="MAX")
            pending, late = (int(f) for f in flags.tolist())
            if not pending:
                return
            if late:
                break
            time.sleep(0.5)
        log.error("CHECKPOINT UPLOAD NOT FINISHED within %.0fs: the newest checkpoints are only in %s; the next "
                  "start there resumes from them and uploads them", self.upload_timeout if timeout is None else timeout,
                  self.local_root)

    def hold(self, step: int) -> None:
        """Keep the local checkpoint of `step` until `release(step)` (train/callbacks/fid_eval.py, mode process)."""
        self.held.add(step)

    def release(self, step: int) -> None:
        """Let retention have the checkpoint of `step` again, and apply it."""
        self.held.discard(step)
        self._prune_local()

    def _prune_local(self):
        """Retention over the complete local checkpoints; incomplete ones and stale `.tmp` folders older
        than the newest save are leftovers of killed processes."""
        if dist.get_local_rank() != 0:
            return
        existing = local_checkpoints(self.local_root)
        complete = [s for s, folder in existing if (folder / MANIFEST).is_file()]
        pinned = self.uploader.pinned if self.uploader is not None else set()
        for step, folder in existing:
            if step in self.milestones or step > self.agreed or step in pinned or step in self.held:
                continue
            if step in complete[: self.keep_last] or (step not in complete and step >= self.last_saved_step):
                continue
            shutil.rmtree(folder, ignore_errors=True)
        for tmp in (self.local_root / CHECKPOINTS).glob("step-*.tmp"):
            if (s := step_of(tmp.name[:-4])) is not None and s < self.last_saved_step:
                shutil.rmtree(tmp, ignore_errors=True)


def finish_uploads(trainer) -> None:
    """For a run that has nothing left to train: upload what an earlier process could not, and wait."""
    for callback in trainer.state.callbacks:
        if isinstance(callback, CheckpointSaver):
            callback.start_uploads()
            callback.finish(trainer.state)
