"""Non-finite loss or gradient: the optimizer already refused the step (train/optim.py); here the run
either stops with a checkpoint of the last good state and a clear message, or logs and goes on.

Test hook: with the environment variable DIP_TEST_NONFINITE_STEP=N, step N's loss is made NaN (on every
rank), so that the tests can exercise both modes in a real run. Unset, it costs nothing.
"""

from __future__ import annotations

import logging
import os

from composer.core import Callback, State
from composer.loggers import Logger

from dip_scale.train.callbacks.preemption import ignore_signals
from dip_scale.train.exits import EXIT_NONFINITE

log = logging.getLogger(__name__)



class NonFiniteStop(SystemExit):
    """Training stopped on a non-finite loss or gradient (not a reason to requeue)."""


TEST_STEP_ENV = "DIP_TEST_NONFINITE_STEP"


class NonFiniteGuard(Callback):
    def __init__(self, mode: str, saver):
        self.mode = mode
        self.saver = saver
        self.poison_step = int(os.environ.get(TEST_STEP_ENV, "0")) or None

    def after_loss(self, state: State, logger: Logger):
        if self.poison_step is not None and int(state.timestamp.batch) + 1 == self.poison_step:
            log.warning("%s=%d: making this step's loss NaN", TEST_STEP_ENV, self.poison_step)
            state.loss["total"].mul_(float("nan"))  # in place: the tensor Composer backpropagates

    def batch_end(self, state: State, logger: Logger):
        optimizer = state.optimizers[0]
        if not getattr(optimizer, "last_step_skipped", False):
            return
        step = int(state.timestamp.batch)
        logger.log_metrics({"train/skipped_steps": optimizer.skipped_steps})
        if self.mode == "skip":
            log.warning("step %d: non-finite loss or gradient (norm %s); the update was skipped", step,
                        optimizer.last_grad_norm)
            return
        path = self.saver.save(state)
        self.saver.finish(state)
        msg = (f"step {step}: non-finite loss or gradient (gradient norm {optimizer.last_grad_norm}). The update was "
               f"not applied; the last good weights are checkpointed in {path}. Lower the learning rate, check the "
               "data, or set train.nonfinite=skip to step over such batches.")
        log.error(msg)
        ignore_signals()
        raise NonFiniteStop(EXIT_NONFINITE)
