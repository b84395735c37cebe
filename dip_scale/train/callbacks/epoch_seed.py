"""Tell the model which epoch it is in: each sample's noise seed is (run seed, epoch, sample id), so a
sample gets fresh noise every epoch and the same noise whichever rank sees it."""

from __future__ import annotations

from composer.core import Callback, State
from composer.loggers import Logger


class EpochSeed(Callback):
    def __init__(self, model):
        self.model = model

    def batch_start(self, state: State, logger: Logger):
        # Every batch, not at epoch_start: a run resumed mid-epoch gets no epoch_start event.
        self.model.epoch = int(state.timestamp.epoch)
