"""The thin ComposerModel around DiP: batch -> flow-matching (+ REPA) loss. Nothing else lives here.

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
from dip_scale.diffusion.flow import FlowMatching, sample_seeds


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
        return self.flow.loss(self.net, x, labels, seeds=seeds, repa=self.repa, repa_block=self.repa_block,
                              patch_size=self.net.config.patch_size)

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
