"""Exponential moving average of the weights, in float32 (docs/dip.md, "Recipe": decay 0.9999
every step).

The average is a frozen copy of the network. The training wrapper registers it as a submodule, so every
parallel strategy shards, checkpoints and restores it exactly like the live weights (FSDP shards it
with the parameters, DeepSpeed partitions it), and sampling simply calls it.

    ema_net = make_ema(net)
    ...after each optimizer step:  ema_update(local_tensors(ema_net), local_tensors(net), decay)
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn


def make_ema(net: nn.Module) -> nn.Module:
    """A float32 copy of `net` that no optimizer or autograd touches."""
    ema = copy.deepcopy(net).float().eval()
    ema.requires_grad_(False)
    return ema


def local_tensors(module: nn.Module) -> list[torch.Tensor]:
    """The parameter storage this process owns: the shard of a DTensor (FSDP2), else the tensor itself."""
    out = []
    for p in module.parameters():
        t = p.detach()
        out.append(t.to_local() if hasattr(t, "to_local") else t)
    return out


@torch.no_grad()
def ema_update(ema: Sequence[torch.Tensor], live: Sequence[torch.Tensor], decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * live, tensor by tensor (same layouts)."""
    if len(ema) != len(live):
        raise ValueError(f"EMA holds {len(ema)} tensors but the model has {len(live)}")
    live32 = [t if t.dtype == torch.float32 else t.float() for t in live]
    torch._foreach_lerp_(list(ema), live32, 1.0 - decay)
