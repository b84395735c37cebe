"""Rectified-flow objective of DiP, as in the released code (docs/dip.md, "Objective").

    x_t = t * x + (1 - t) * eps,  eps ~ N(0, I),  t = sigmoid(n), n ~ N(0, 1)   (t = 0 is pure noise)
    target v = x - eps;  loss = mean((v_hat - v)^2)

Class labels are replaced by the null id with probability `label_dropout` so that one network learns both
the conditional and the unconditional velocity (classifier-free guidance).

The random draws of a sample (t, eps, label drop) can come from a per-sample seed. Training derives that
seed from (run seed, epoch, sample id), so a sample gets the same draws whichever rank, micro-batch or world
size processes it: runs on 1, 2 or N ranks, and runs resumed on another rank count, follow the same loss
curve.

    inputs = flow.training_inputs(x, y, seeds)              # x_t, t, labels after dropout, target v
    loss = velocity_loss(net(inputs.x_t, inputs.t, inputs.y), inputs.v)

This file holds the pieces; the training wrapper (dip_scale.train.module) calls the network and adds the
REPA term (dip_scale.diffusion.repa) to this one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Draws:
    t: torch.Tensor  # (B,) in (0, 1)
    eps: torch.Tensor  # (B, 3, H, W)
    drop: torch.Tensor  # (B,) bool: replace the label by the null class


@dataclass
class FlowInputs:
    x_t: torch.Tensor  # (B, 3, H, W) the noisy images
    t: torch.Tensor  # (B,) their times
    y: torch.Tensor  # (B,) labels, the dropped ones replaced by the null class
    v: torch.Tensor  # (B, 3, H, W) the target velocity x - eps


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

    def training_inputs(self, x: torch.Tensor, y: torch.Tensor, seeds: list[int] | None = None) -> FlowInputs:
        """What the network sees and must predict for clean images x in [-1, 1] (B, 3, H, W) and labels y
        (B,): one draw of (t, eps, label drop) per sample, from `seeds` when given."""
        d = self.draw(tuple(x.shape), x.device, seeds)
        x_t, v = self.interpolate(x, d.eps.to(x.dtype), d.t)
        y = torch.where(d.drop, torch.full_like(y, self.num_classes), y)
        return FlowInputs(x_t=x_t, t=d.t, y=y, v=v)


def velocity_loss(v_hat: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """mean((v_hat - v)^2) over batch, channels and pixels, in float32."""
    return (v_hat.float() - v.float()).pow(2).mean()
