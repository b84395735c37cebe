"""ODE sampler for the rectified flow: integrate dx/dt = v(x, t, y) from t = 0 (noise) to t = 1 (data).

Classifier-free guidance is batched (cond and uncond in one forward) and applied only while t lies inside
the guidance interval [lo, hi] (docs/dip.md, "Sampling"); outside it, only the conditional half is run.

    cfg = SamplerConfig(steps=100, guidance_scale=2.9, guidance_interval=(0.11, 0.97))
    x = sample(model, sample_noise(range(8), (3, 256, 256), seed=0), labels, cfg, null_class=1000)

Noise comes per sample from (seed, global sample index), so a sample is the same image whichever rank or
batch produces it.

For speed on a GPU, sample with a prepared network instead of autocast (bf16 weights, compiled, CUDA graphs):
    fast = prepare_for_sampling(model, dtype=torch.bfloat16, compile=True)
    x = sample(fast, noise, labels, cfg, null_class=1000)
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from dip_scale.models import channels_last_weights

METHODS = ("euler", "heun")


@dataclass
class SamplerConfig:
    """How samples are drawn: the one settings type of the recipe's `sampler:` section, dip-sample, dip-eval
    and the scheduled evaluation. Flags on top of a recipe's settings: `settings.merged(steps=..., ...)`."""

    steps: int = 100
    """Number of uniform steps from t = 0 to t = 1."""
    method: str = "euler"
    """euler (one evaluation a step) or heun (two)."""
    guidance_scale: float = 1.0
    """CFG scale g: v = v_u + g (v_c - v_u); 1 disables guidance."""
    guidance_interval: tuple[float, float] = (0.1, 1.0)
    """Guidance applies while lo <= t <= hi (released configs: (0.1, 1.0); paper: (0.11, 0.97))."""

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"sampler.method must be one of {list(METHODS)}, got {self.method!r}")
        if self.steps < 1:
            raise ValueError(f"sampler.steps must be >= 1, got {self.steps}")
        if self.guidance_scale < 0:
            raise ValueError(f"sampler.guidance_scale must be >= 0, got {self.guidance_scale}")
        interval = tuple(float(v) for v in self.guidance_interval)
        if len(interval) != 2 or not 0.0 <= interval[0] <= interval[1] <= 1.0:
            raise ValueError(f"sampler.guidance_interval must be [lo, hi] with 0 <= lo <= hi <= 1, got "
                             f"{list(self.guidance_interval)}")
        self.guidance_interval = interval

    def merged(self, **flags) -> SamplerConfig:
        """These settings with every flag that is not None on top (and checked)."""
        return dataclasses.replace(self, **{k: v for k, v in flags.items() if v is not None})

    def guided(self, t: float) -> bool:
        lo, hi = self.guidance_interval
        return self.guidance_scale != 1.0 and lo <= t <= hi


def sample_noise(indices: Iterable[int], shape: tuple[int, ...], seed: int, device="cpu") -> torch.Tensor:
    """Gaussian noise (B, *shape) where row i depends only on (seed, indices[i])."""
    rows = []
    for index in indices:
        g = torch.Generator().manual_seed((int(seed) * 1_000_003 + int(index)) % (2**63 - 1))
        rows.append(torch.randn(shape, generator=g))
    return torch.stack(rows).to(device)


def velocity(model: nn.Module, x: torch.Tensor, t: float, y: torch.Tensor, config: SamplerConfig,
             null_class: int) -> torch.Tensor:
    """v(x, t, y), with batched CFG inside the guidance interval. Returned in float32."""
    tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.float32)
    if not config.guided(t):
        return model(x, tt, y).float()
    null = torch.full_like(y, null_class)
    v = model(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([y, null])).float()
    v_cond, v_uncond = v.chunk(2)
    return v_uncond + config.guidance_scale * (v_cond - v_uncond)


class _CastInput(nn.Module):
    """The network with its weights in `dtype`, called on the float32 sampler state."""

    def __init__(self, net: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.net, self.dtype = net, dtype

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.net(x.to(self.dtype), t, y)


class _Compiled(nn.Module):
    """torch.compile of a sampling network for fixed shapes (each batch size and the doubled CFG batch get
    their own graph). With CUDA graphs every call is a new graph step, and the output is copied out of the
    graph's memory before the next replay overwrites it."""

    def __init__(self, net: nn.Module, cuda_graphs: bool, backend: str):
        super().__init__()
        self.net = net
        self.cuda_graphs = cuda_graphs and backend == "inductor"
        self.compiled = torch.compile(net, mode="reduce-overhead" if self.cuda_graphs else None, dynamic=False,
                                      backend=backend)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        return self.compiled(x, t, y).clone()


def prepare_for_sampling(model: nn.Module, *, dtype: torch.dtype | None = None, compile: bool = False,
                         backend: str = "inductor") -> nn.Module:
    """A network to pass to `sample` instead of `model` (which is left untouched).

    dtype: a copy of the weights in this dtype (bf16 on a GPU), so no per-call casts of the weights as under
        autocast, with the conv head's weights channels-last; the sampler's float32 state is cast on the way
        in, outputs are cast back by `velocity`.
    compile: torch.compile for fixed shapes; on a GPU with CUDA graphs, which removes the kernel-launch
        overhead that dominates small batches (measured in docs/benchmarks.md). The first calls of each
        shape compile (about a minute for DiP-XL/16): worth it for many samples or many steps.
    """
    net = model
    if dtype is not None and any(p.dtype != dtype for p in model.parameters()):
        net = _CastInput(channels_last_weights(copy.deepcopy(model).to(dtype)), dtype)
    if compile:
        device = next(model.parameters()).device
        net = _Compiled(net, cuda_graphs=device.type == "cuda", backend=backend)
    return net


@torch.no_grad()
def sample(model: nn.Module, noise: torch.Tensor, y: torch.Tensor, config: SamplerConfig, null_class: int,
           autocast_dtype: torch.dtype | None = None, progress: bool = False) -> torch.Tensor:
    """Integrate from the noise (t = 0) to t = 1; returns float32 images (B, 3, H, W), unclipped."""
    x = noise.float()
    times = torch.linspace(0.0, 1.0, config.steps + 1).tolist()
    amp = (torch.autocast(x.device.type, dtype=autocast_dtype) if autocast_dtype is not None
           else contextlib.nullcontext())
    with amp:
        for i in tqdm(range(config.steps), desc="sampling", disable=not progress, leave=False):
            t0, t1 = times[i], times[i + 1]
            v0 = velocity(model, x, t0, y, config, null_class)
            if config.method == "euler":
                x = x + (t1 - t0) * v0
            else:
                x_pred = x + (t1 - t0) * v0
                v1 = velocity(model, x_pred, t1, y, config, null_class)
                x = x + (t1 - t0) * 0.5 * (v0 + v1)
    return x


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Float images in [-1, 1] (B, 3, H, W) -> uint8 NHWC, as the ADM evaluator stores them."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()
