"""Update the EMA network after every optimizer step (docs/dip.md, "Recipe": 0.9999 every step).

The EMA is a frozen submodule of the training wrapper (`ema_net`), so it is sharded, checkpointed and
restored with the model under every strategy; this callback only moves it. Steps that the optimizer
refused (non-finite gradients) leave it untouched.
"""

from __future__ import annotations

from composer.core import Callback, State
from composer.loggers import Logger

from dip_scale.diffusion.ema import ema_update, local_tensors


class EMAUpdate(Callback):
    def __init__(self, model, decay: float, tensors=local_tensors):
        self.model = model  # the DiPComposerModel (unwrapped)
        self.decay = decay
        self.tensors = tensors  # how to reach this rank's storage of a module's parameters

    def batch_end(self, state: State, logger: Logger):
        optimizer = state.optimizers[0]
        if getattr(optimizer, "last_step_skipped", False):
            return
        ema_update(self.tensors(self.model.ema_net), self.tensors(self.model.net), self.decay)
