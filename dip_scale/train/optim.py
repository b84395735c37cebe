"""AdamW that knows the global gradient norm, refuses non-finite steps and can clip.

Composer calls `step(closure)` where the closure runs every micro-batch's forward and backward. After it,
the global gradient norm is measured (a collective for sharded gradients, so every rank sees the same
number) and a step with a non-finite loss or gradient leaves parameters and moments untouched. What then
happens to the run (stop with a checkpoint, or go on) is the NonFiniteGuard callback's decision. With
`max_grad_norm` > 0 a finite step whose norm is above it scales the gradients down to that norm first (the
reported norm stays the one measured before clipping).
"""

from __future__ import annotations

import math

import torch
from composer.utils import dist


def global_grad_norm(params: list[torch.Tensor]) -> float:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
    if hasattr(norm, "full_tensor"):  # FSDP2: DTensor gradients give a partial norm
        norm = norm.full_tensor()
    return float(norm)


def use_fused_adamw(device: str, strategy: str) -> bool:
    """Whether to use torch's fused AdamW kernel: on GPUs under ddp, where the parameters stay plain tensors.
    It updates every tensor in a few launches and reads each value once; for DiP-XL/16 on an H200 it cut the
    optimizer's share of a training step (docs/perf_log.md). Under FSDP2 the optimizer holds DTensors and
    keeps the multi-tensor (foreach) path; on CPUs the default path is kept. Same update up to rounding."""
    return device == "gpu" and strategy == "ddp"


class GuardedAdamW(torch.optim.AdamW):
    def __init__(self, params, max_grad_norm: float = 0.0, **kwargs):
        super().__init__(params, **kwargs)
        if max_grad_norm < 0:
            raise ValueError(f"max_grad_norm must be >= 0, got {max_grad_norm}")
        self.max_grad_norm = max_grad_norm
        self.last_grad_norm = 0.0
        self.last_step_skipped = False
        self.skipped_steps = 0

    def step(self, closure=None):
        loss = closure() if closure is not None else None
        params = [p for group in self.param_groups for p in group["params"]]
        self.last_grad_norm = global_grad_norm(params)
        bad = torch.tensor([0.0 if math.isfinite(self.last_grad_norm) and (loss is None or math.isfinite(loss))
                            else 1.0])
        if dist.get_world_size() > 1:
            bad = bad.to(params[0].device if params[0].device.type != "meta" else "cpu")
            dist.all_reduce(bad, reduce_operation="MAX")
        self.last_step_skipped = bool(bad.item())
        if self.last_step_skipped:
            self.skipped_steps += 1
            self.zero_grad(set_to_none=True)
            return loss
        if 0 < self.max_grad_norm < self.last_grad_norm:
            scale = self.max_grad_norm / (self.last_grad_norm + 1e-6)
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(scale)
        super().step()
        return loss
