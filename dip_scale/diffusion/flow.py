"""Rectified-flow objective of DiP (DIP_SPEC.md section 2, as in the released code).

    x_t = t * x + (1 - t) * eps,  eps ~ N(0, I),  t = sigmoid(n), n ~ N(0, 1)   (t = 0 is pure noise)
    target v = x - eps;  loss = mean((v_hat - v)^2)

Class labels are replaced by the null id with probability `label_dropout` so that one network learns both
the conditional and the unconditional velocity (classifier-free guidance).

The random draws of a sample (t, eps, label drop) can come from a per-sample seed. Training derives that
seed from (run seed, epoch, sample id), so a sample gets the same draws whichever rank, micro-batch or world
size processes it: runs on 1, 2 or N ranks, and runs resumed on another rank count, follow the same loss
curve.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Draws:
    t: torch.Tensor  # (B,) in (0, 1)
    eps: torch.Tensor  # (B, 3, H, W)
    drop: torch.Tensor  # (B,) bool: replace the label by the null class


def sample_seeds(seed: int, epoch: int, sample_ids: torch.Tensor) -> list[int]:
    """One 63-bit seed per sample from (run seed, epoch, sample id)."""
    base = (int(seed) * 0x9E3779B1 + int(epoch) * 0x85EBCA77) % (2**61)
    return [(base + int(i) * 0xC2B2AE3D) % (2**63 - 1) for i in sample_ids.tolist()]


@dataclass
class FlowMatching:
    num_classes: int
    """The null class id (labels are 0..num_classes-1)."""
    label_dropout: float = 0.1
    """Probability of replacing a label by the null class."""
    t_mean: float = 0.0
    """Mean of the logit-normal t distribution."""
    t_std: float = 1.0
    """Standard deviation of the logit-normal t distribution."""

    def draw(self, shape: tuple[int, ...], device, seeds: list[int] | None = None) -> Draws:
        """t, eps and label drops for a batch of `shape` (B, C, H, W): from the global RNG, or one
        generator per sample when `seeds` is given."""
        if seeds is None:
            n = torch.randn(shape[0], device=device)
            eps = torch.randn(shape, device=device)
            u = torch.rand(shape[0], device=device)
        else:
            n, eps, u = [], [], []
            for s in seeds:
                g = torch.Generator(device=device).manual_seed(s)
                n.append(torch.randn(1, device=device, generator=g))
                u.append(torch.rand(1, device=device, generator=g))
                eps.append(torch.randn(shape[1:], device=device, generator=g))
            n, u, eps = torch.cat(n), torch.cat(u), torch.stack(eps)
        t = torch.sigmoid(n * self.t_std + self.t_mean)
        return Draws(t=t, eps=eps, drop=u < self.label_dropout)

    @staticmethod
    def interpolate(x: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_t, target velocity) for clean x, noise eps and times t (B,)."""
        t_ = t.view(-1, *([1] * (x.ndim - 1)))
        return t_ * x + (1 - t_) * eps, x - eps

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, seeds: list[int] | None = None,
             repa: nn.Module | None = None, repa_block: int = 8, patch_size: int = 16) -> dict[str, torch.Tensor]:
        """Training loss on clean images x in [-1, 1] (B, 3, H, W) and labels y (B,).

        With REPA, the hidden state after `repa_block` blocks (a grid of patch_size patches) is aligned to
        the frozen encoder's features of x. Returns {"loss", "flow"} and, with REPA, {"repa"} (already
        weighted); "loss" is their sum."""
        d = self.draw(tuple(x.shape), x.device, seeds)
        x_t, v = self.interpolate(x, d.eps.to(x.dtype), d.t)
        y = torch.where(d.drop, torch.full_like(y, self.num_classes), y)
        if repa is None:
            v_hat = model(x_t, d.t, y)
            flow = (v_hat.float() - v.float()).pow(2).mean()
            return {"loss": flow, "flow": flow}
        v_hat, hidden = model(x_t, d.t, y, feature_block=repa_block)
        flow = (v_hat.float() - v.float()).pow(2).mean()
        repa_loss = repa(hidden, x, (x.shape[-2] // patch_size, x.shape[-1] // patch_size))
        return {"loss": flow + repa_loss, "flow": flow, "repa": repa_loss}
