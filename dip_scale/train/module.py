"""The thin ComposerModel around DiP: batch -> flow-matching (+ REPA) loss. Nothing else lives here.

The loss terms meet here: the rectified-flow pieces come from diffusion/flow.py, the alignment term from
diffusion/repa.py, and the network is called through its interface (forward, forward_with_hidden).

Submodules: `net` (the DiP being trained), `ema_net` (its float32 moving average, frozen; updated by
callbacks/ema.py) and, with REPA, `repa` (the trainable projector; the frozen encoder is held outside the
module tree so it is neither checkpointed nor sharded).
"""

from __future__ import annotations

import contextlib

import torch
from composer.models import ComposerModel
from torch import nn

from dip_scale.diffusion.ema import make_ema
from dip_scale.diffusion.flow import FlowMatching, sample_seeds, velocity_loss


class DiPComposerModel(ComposerModel):
    def __init__(self, net: nn.Module, flow: FlowMatching, seed: int, repa: nn.Module | None = None,
                 repa_block: int = 8):
        super().__init__()
        self.net = net
        self.ema_net = make_ema(net)
        self.repa = repa
        self.flow = flow
        self.seed = seed
        self.repa_block = repa_block
        self.epoch = 0  # set by callbacks/epoch.py; part of each sample's noise seed

    def forward(self, batch):
        images, labels, sample_ids = batch
        # Shards ship uint8 pixels; normalising here keeps the work on the accelerator.
        x = images.float().div_(127.5).sub_(1.0) if images.dtype == torch.uint8 else images.float()
        seeds = sample_seeds(self.seed, self.epoch, sample_ids)
        inputs = self.flow.training_inputs(x, labels, seeds)
        if self.repa is None:
            flow = velocity_loss(self.net(inputs.x_t, inputs.t, inputs.y), inputs.v)
            return {"loss": flow, "flow": flow}
        v_hat, hidden = self.net.forward_with_hidden(inputs.x_t, inputs.t, inputs.y, self.repa_block)
        flow = velocity_loss(v_hat, inputs.v)
        repa = self.repa(hidden, x)  # aligned with the clean images' encoder features, already weighted
        return {"loss": flow + repa, "flow": flow, "repa": repa}

    def loss(self, outputs, batch):
        # Composer backpropagates "total" and logs every entry as loss/train/<name>.
        return {"total": outputs["loss"], **{k: v for k, v in outputs.items() if k != "loss"}}

    @contextlib.contextmanager
    def ema_network(self):
        """The EMA network in eval mode, for sampling. Call on every rank: a sharded EMA gathers its
        weights collectively inside forward."""
        was_training = self.ema_net.training
        self.ema_net.eval()
        try:
            yield self.ema_net
        finally:
            self.ema_net.train(was_training)
