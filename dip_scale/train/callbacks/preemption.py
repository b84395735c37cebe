"""Checkpoint on SIGTERM / SIGUSR1 (what Slurm sends before preemption or the time limit), on Ctrl-C, or when
the data store stays unreachable, then exit with EXIT_PREEMPTED, which cluster/train.sh turns into a requeue
(and after which the same command continues).

The handler only raises a flag. When the next batch has been fetched and before the step runs, the ranks
agree (one max-reduce) on two things: did any rank get a signal, and did any rank get a stop batch instead of
data (data/guard.py: the store stayed unreachable, no batch came within data.stall_timeout, or a signal came
while waiting for one). If so, every rank takes part in a checkpoint of the last completed step (its data
position is that step's: the fetched batch is not lost), uploads are waited for up to the grace period, and
the process exits.
A second signal exits at once: the checkpoint being written then has no manifest, so it never counts as
complete (see dip_scale.checkpoint). The exception is a SIGTERM after a SIGINT: Ctrl-C in a terminal reaches
the ranks and their composer launcher together, and the launcher passes it on as SIGTERM, so that one is the
same request (a second Ctrl-C still exits at once). Before training starts (imports, resume, download), a signal exits
with EXIT_PREEMPTED at once: there is nothing new to save (the handler __main__ installs first of all).
"""

from __future__ import annotations

import logging
import os
import signal

import torch
from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist

from dip_scale.data.guard import is_stop_batch
from dip_scale.data.streaming import request_stop
from dip_scale.train.exits import EXIT_PREEMPTED, SIGNALS

log = logging.getLogger(__name__)


class Preempted(SystemExit):
    """Training stopped on a signal after saving a checkpoint; rerun the same command to resume."""


def ignore_signals() -> None:
    """For a process that is on its way out with a status of its own (75, 3, 2). Another rank may leave first;
    its launcher then stops the others with SIGTERM, and a process that died of it (as an exiting interpreter
    does, having restored the default handlers) would report 128 + 15 instead, which no job script
    requeues. An ignored signal stays ignored through the interpreter's exit."""
    for sig in SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


class PreemptionCheckpoint(Callback):
    def __init__(self, saver, grace: float = 90.0):
        self.saver = saver
        self.grace = grace
        self.signal: int | None = None
        self.relayed = False

    def fit_start(self, state: State, logger: Logger):
        # Replaces the start's handler (exit 75 at once: nothing new to save) and Composer's (exit 143).
        for sig in SIGNALS:
            signal.signal(sig, self._handle)
        if dist.get_global_rank() == 0:
            log.info("training %s from step %d; from now on SIGTERM / SIGUSR1 / Ctrl-C checkpoint, then exit %d",
                     state.run_name, int(state.timestamp.batch), EXIT_PREEMPTED)

    def stop_requested(self) -> bool:
        return self.signal is not None

    def _handle(self, signum, frame):
        if self.signal == signal.SIGINT and signum == signal.SIGTERM and not self.relayed:
            self.relayed = True  # the launcher passing on the same Ctrl-C
            return
        if self.signal is not None:
            log.error("second signal %s: exiting now without waiting for the checkpoint", signal.Signals(signum).name)
            os._exit(EXIT_PREEMPTED)
        self.signal = signum
        request_stop()  # downloads give up instead of retrying: the run is about to stop
        log.warning("received %s: checkpointing the last completed step and stopping", signal.Signals(signum).name)

    def after_dataloader(self, state: State, logger: Logger):
        flags = torch.tensor([0 if self.signal is None else 1, int(is_stop_batch(state.batch))])
        flags = state.device.tensor_to_device(flags)
        dist.all_reduce(flags, reduce_operation="MAX")
        signalled, no_data = (int(f) for f in flags.tolist())
        if not (signalled or no_data):
            return
        request_stop()
        step = int(state.timestamp.batch)
        why = "a preemption signal" if signalled else "the data store (see DATA UNAVAILABLE above)"
        if step == 0:  # nothing trained yet: a rerun starts afresh, exactly as this run did
            log.warning("preempted before the first step (stopped by %s): nothing to checkpoint; exiting with %d so "
                        "the job is requeued", why, EXIT_PREEMPTED)
            ignore_signals()
            raise Preempted(EXIT_PREEMPTED)
        path = self.saver.save(state)
        self.saver.finish(state, timeout=self.grace)
        log.warning("preempted at step %d: checkpoint %s written (stopped by %s); exiting with %d so the job is "
                    "requeued", step, path, why, EXIT_PREEMPTED)
        ignore_signals()
        raise Preempted(EXIT_PREEMPTED)
