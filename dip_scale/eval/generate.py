"""Class-balanced, seeded sample generation spread over the ranks of a job, and gathering to rank 0.

Sample i (0 <= i < N) has class i % num_classes and the noise of (seed, i) (sampler.sample_noise), so
every class gets N / num_classes samples and any batch holds many classes. The index range is cut into
global batches [b*B, (b+1)*B) of the per-rank batch size B; rank r makes a fixed contiguous run of those
batches. A batch is therefore the same computation whichever rank runs it, and for a given B the images
of a W-rank job are exactly those of a 1-rank job. The last batch is padded with indices >= N (computed
and dropped), so a compiled model sees a single shape.

    for batch in generate(model, num_samples=50_000, seed=0, sampler=cfg, batch_size=64, device="cuda"):
        batch.indices, batch.labels, batch.images  # (b,), (b,), uint8 (b, H, W, 3)
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from dip_scale.diffusion.sampler import SamplerConfig, prepare_for_sampling, sample, sample_noise, to_uint8


def world() -> tuple[int, int]:
    """(rank, world size) of the default process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def broadcast_object(obj):
    """Rank 0's `obj` on every rank (a no-op without a process group)."""
    if world()[1] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def class_labels(indices: torch.Tensor | range, num_classes: int) -> torch.Tensor:
    """The fixed class of each sample index: i % num_classes."""
    return torch.as_tensor(list(indices) if isinstance(indices, range) else indices, dtype=torch.long) % num_classes


def check_num_samples(num_samples: int, num_classes: int) -> None:
    if num_samples <= 0:
        raise ValueError(f"the number of samples must be positive, got {num_samples}")
    if num_samples % num_classes:
        lo = num_samples // num_classes * num_classes
        nearest = " or ".join(str(n) for n in (lo, lo + num_classes) if n > 0)
        raise ValueError(f"the number of samples ({num_samples}) must be divisible by the number of classes "
                         f"({num_classes}) for a class-balanced set; use {nearest}")


@dataclass(frozen=True)
class Plan:
    """Which global batches (start, end) each rank makes."""

    num_samples: int
    batch_size: int
    world_size: int

    def __post_init__(self):
        if self.batch_size <= 0:
            raise ValueError(f"the per-rank batch size must be positive, got {self.batch_size}")

    @property
    def num_batches(self) -> int:
        return -(-self.num_samples // self.batch_size)

    def batches(self, rank: int) -> list[tuple[int, int]]:
        nb, w = self.num_batches, self.world_size
        first, last = rank * nb // w, (rank + 1) * nb // w
        return [(b * self.batch_size, min((b + 1) * self.batch_size, self.num_samples)) for b in range(first, last)]

    def count(self, rank: int) -> int:
        return sum(end - start for start, end in self.batches(rank))

    def counts(self) -> list[int]:
        return [self.count(r) for r in range(self.world_size)]


@dataclass
class Batch:
    indices: torch.Tensor  # (b,) global sample indices, ascending
    labels: torch.Tensor  # (b,) class ids
    images: torch.Tensor  # (b, H, W, 3) uint8, on the generating device


def default_autocast(device: torch.device) -> torch.dtype | None:
    """bf16 on GPUs that have it; float32 elsewhere (CPU autocast would only slow the tiny test models)."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


@torch.no_grad()
def sample_images(net: nn.Module, indices: Sequence[int], labels: torch.Tensor, *, seed: int, sampler: SamplerConfig,
                  image_size: tuple[int, int], device: torch.device, autocast_dtype: torch.dtype | None,
                  null_class: int) -> torch.Tensor:
    """uint8 images (B, H, W, 3) of the samples `indices` (the noise of (seed, index)) with class `labels` (B,)."""
    noise = sample_noise(indices, (3, *image_size), seed, device)  # (B, 3, H, W)
    x = sample(net, noise, labels.to(device), sampler, null_class=null_class, autocast_dtype=autocast_dtype)
    return to_uint8(x)


@torch.no_grad()
def generate(model: nn.Module, *, num_samples: int, seed: int, sampler: SamplerConfig, batch_size: int,
             device: str | torch.device, image_size: tuple[int, int] = (256, 256),
             autocast_dtype: torch.dtype | None | str = "auto", compile_model: bool = False,
             progress: bool = True) -> Iterator[Batch]:
    """This rank's share of the N class-balanced samples, batch by batch (see the module docstring)."""
    num_classes = model.config.num_classes
    check_num_samples(num_samples, num_classes)
    device = torch.device(device)
    rank, world_size = world()
    plan = Plan(num_samples, batch_size, world_size)
    if autocast_dtype == "auto":
        autocast_dtype = default_autocast(device)
    net = model
    if compile_model:  # weights cast once instead of autocast, compiled (CUDA graphs on a GPU)
        net = prepare_for_sampling(model, dtype=autocast_dtype, compile=True)
        autocast_dtype = None
    bar = tqdm(total=plan.count(rank), unit="img", disable=not progress or rank != 0, dynamic_ncols=True,
               desc=f"sampling (rank 0 of {world_size}, {num_samples} in all)" if world_size > 1 else "sampling")
    with bar:
        for start, end in plan.batches(rank):
            # a short last batch is filled up with indices >= N (computed, dropped): one shape throughout
            indices = range(start, start + batch_size)
            labels = class_labels(indices, num_classes)
            images = sample_images(net, indices, labels, seed=seed, sampler=sampler, image_size=tuple(image_size),
                                   device=device, autocast_dtype=autocast_dtype, null_class=num_classes)
            n = end - start
            bar.update(n)
            yield Batch(torch.arange(start, end), labels[:n].cpu(), images[:n])


# ----------------------------------------------------------------------------------------------------
# Gathering
# ----------------------------------------------------------------------------------------------------


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def gather_rows(local: torch.Tensor, counts: list[int], chunk_bytes: int = 32 << 20) -> torch.Tensor | None:
    """Concatenate every rank's rows in rank order on rank 0 (CPU); None on the other ranks.

    `counts[r]` is the number of rows rank r holds (all ranks know it from the Plan); a rank without rows
    passes an empty (0, *row_shape) tensor of the same dtype. Rows travel in
    chunks of about chunk_bytes so that gathering 50,000 images never needs them all on one GPU."""
    rank, world_size = world()
    if local.shape[0] != counts[rank]:
        raise ValueError(f"rank {rank} holds {local.shape[0]} rows but the plan says {counts[rank]}")
    if world_size == 1:
        return local.cpu()
    device = _comm_device()
    row_shape = tuple(local.shape[1:])
    row_bytes = max(1, math.prod(row_shape) * local.element_size())
    chunk = max(1, min(chunk_bytes // row_bytes, max(counts)))
    parts: list[list[torch.Tensor]] = [[] for _ in range(world_size)]
    for begin in range(0, max(counts), chunk):
        buf = torch.zeros((chunk, *row_shape), dtype=local.dtype, device=device)
        piece = local[begin:begin + chunk]
        buf[: piece.shape[0]] = piece.to(device)
        bufs = [torch.empty_like(buf) for _ in range(world_size)] if rank == 0 else None
        dist.gather(buf, bufs, dst=0)
        if rank == 0:
            for r, b in enumerate(bufs):
                take = min(max(counts[r] - begin, 0), chunk)
                if take:
                    parts[r].append(b[:take].cpu())
    if rank != 0:
        return None
    rows = [t for p in parts for t in p]
    return torch.cat(rows) if rows else local.new_zeros((0, *row_shape)).cpu()
