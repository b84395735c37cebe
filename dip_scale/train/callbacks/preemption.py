"""Checkpoint on SIGTERM / SIGUSR1 (what Slurm sends before preemption or the time limit), then exit with
EXIT_PREEMPTED, which cluster/train.sh turns into a requeue.

The handler only raises a flag; at the next step boundary the ranks agree on it (a max-reduce), every
rank takes part in the checkpoint, uploads are waited for up to the grace period, and the process exits.
A second signal exits at once: the checkpoint being written then has no manifest, so it never counts as
complete (see train/checkpoints.py).
"""

from __future__ import annotations

import logging
import os
import signal

import torch
from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist

log = logging.getLogger(__name__)

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: try again later
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(SystemExit):
    """Training stopped on a signal after saving a checkpoint; rerun the same command to resume."""


class PreemptionCheckpoint(Callback):
    def __init__(self, saver, grace: float = 90.0):
        self.saver = saver
        self.grace = grace
        self.signal: int | None = None

    def fit_start(self, state: State, logger: Logger):
        # Replaces Composer's handler, which exits without saving.
        for sig in SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.signal is not None:
            log.error("second signal %s: exiting now without waiting for the checkpoint", signal.Signals(signum).name)
            os._exit(EXIT_PREEMPTED)
        self.signal = signum
        log.warning("received %s: checkpointing at the end of this step", signal.Signals(signum).name)

    def batch_end(self, state: State, logger: Logger):
        flag = state.device.tensor_to_device(torch.tensor([0 if self.signal is None else 1]))
        dist.all_reduce(flag, reduce_operation="MAX")
        if not int(flag.item()):
            return
        step = int(state.timestamp.batch)
        path = self.saver.save(state)
        self.saver.finish(state, timeout=self.grace)
        log.warning("preempted at step %d: checkpoint %s written; exiting with %d so the job is requeued", step,
                    path, EXIT_PREEMPTED)
        raise Preempted(EXIT_PREEMPTED)
