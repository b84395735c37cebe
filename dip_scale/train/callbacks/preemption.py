"""Checkpoint on SIGTERM / SIGUSR1 (what Slurm sends before preemption or the time limit), then exit with
EXIT_PREEMPTED, which cluster/train.sh turns into a requeue.

The handler only raises a flag; at the next step boundary the ranks agree on it (a max-reduce), every
rank takes part in the checkpoint, uploads are waited for up to the grace period, and the process exits.
A second signal exits at once: the checkpoint being written then has no manifest, so it never counts as
complete (see train/checkpoints.py). Before training starts (imports, resume, download), a signal exits
with EXIT_PREEMPTED at once: there is nothing new to save (`exit_on_signal`, installed by __main__).
"""

from __future__ import annotations

import logging
import os
import signal
import sys

import torch
from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist

log = logging.getLogger(__name__)

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: try again later
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(SystemExit):
    """Training stopped on a signal after saving a checkpoint; rerun the same command to resume."""


def ignore_signals() -> None:
    """For a process that is on its way out with a status of its own (75, 3, 2). Another rank may leave first;
    its launcher then stops the others with SIGTERM, and a process that died of it (as an exiting interpreter
    does, having restored the default handlers) would report 128 + 15 instead, which no job script
    requeues. An ignored signal stays ignored through the interpreter's exit."""
    for sig in SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def exit_on_signal() -> None:
    """Until training starts (and PreemptionCheckpoint takes over) there is nothing new to save: a signal exits
    at once with EXIT_PREEMPTED, a requeue, rather than with Composer's 128 + signal, which a job script
    takes for a crash."""
    def leave(signum, frame):
        log.warning("received %s before training started: exiting with %d", signal.Signals(signum).name,
                    EXIT_PREEMPTED)
        ignore_signals()
        sys.exit(EXIT_PREEMPTED)

    for sig in SIGNALS:
        signal.signal(sig, leave)


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
        ignore_signals()
        raise Preempted(EXIT_PREEMPTED)
