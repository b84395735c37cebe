"""Parallelism, applied from outside the model: ddp, fsdp (FSDP2: ZeRO-3 / ZeRO-2 / hybrid) and the hints
Composer reads (which modules to shard, which to checkpoint), plus activation checkpointing and
torch.compile. DeepSpeed lives in train/deepspeed.py.

Units of sharding and recomputation are the DiT blocks and the heads (or the DiT final layer), of both the
live network and its EMA copy.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as torch_dist
from composer.utils import dist
from composer.utils.parallelism import FSDP2Config
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing
from torch.distributed.fsdp import FSDPModule, register_fsdp_forward_method
from torch.distributed.tensor import DTensor

from dip_scale.models import channels_last_weights
from dip_scale.models.dit import DiTBlock
from dip_scale.train.config import Recipe

log = logging.getLogger(__name__)


def shard_units(net: nn.Module) -> list[nn.Module]:
    units: list[nn.Module] = list(net.trunk.blocks)
    return units + [m for m in (net.mid_detailer, net.detailer, net.final_layer) if m is not None]


def fsdp_config(recipe: Recipe) -> FSDP2Config:
    sharding = recipe.parallelism.fsdp.sharding
    if sharding == "hybrid":
        # Composer 0.32's FSDP2Config has no replicate degree, and its State replaces any mesh given here
        # with a 1-D mesh over all ranks: hybrid sharding would silently be full sharding. Say so.
        log.warning("parallelism.fsdp.sharding=hybrid runs as full sharding over all %d ranks: Composer 0.32's "
                    "FSDP2 builds a one-dimensional device mesh (no replicate dimension)", dist.get_world_size())
    return FSDP2Config(
        # ZeRO-3 frees gathered parameters after each unit's forward; ZeRO-2 keeps them until backward, so
        # only gradients and optimizer state stay sharded.
        reshard_after_forward=sharding != "grad_op",
        activation_checkpointing=recipe.train.activation_checkpointing,
        state_dict_type="sharded",
    )


def prepare(model: nn.Module, recipe: Recipe) -> dict | None:
    """Mark, wrap and compile the training wrapper's networks; return Composer's parallelism_config."""
    strategy = recipe.parallelism.strategy
    if strategy == "ddp":  # unsharded parameters only: FSDP2 refuses non-contiguous ones, DeepSpeed flattens
        for net in (model.net, model.ema_net):  # both, so the EMA lerp pairs tensors of one layout
            channels_last_weights(net)
    for net in (model.net, model.ema_net):
        for unit in shard_units(net):
            unit._fsdp_wrap = True
            unit._activation_checkpointing = recipe.train.activation_checkpointing and net is model.net
    if recipe.train.activation_checkpointing and strategy != "fsdp":
        # Under FSDP Composer applies it from the hints above; otherwise we wrap the blocks here.
        apply_activation_checkpointing(model.net, check_fn=lambda m: isinstance(m, DiTBlock))
    if recipe.train.compile:
        # Per unit, before sharding: regional compilation keeps compile time flat in depth and lets FSDP2
        # hooks sit between compiled regions.
        for unit in shard_units(model.net):
            unit.compile()
    if strategy == "fsdp":
        return {"fsdp": fsdp_config(recipe)}
    return None


def register_forward_methods(model: nn.Module) -> None:
    """Let FSDP2 gather parameters around net.forward_with_hidden too. Call after sharding, on every rank.

    FSDP2 unshards a module's own parameters (here the embedders and the mid head's feedback, which no unit
    below `net` holds) in hooks around forward() only; the training wrapper calls forward_with_hidden when
    REPA is on. Without FSDP this does nothing."""
    register_fsdp_forward_method(model.net, "forward_with_hidden")


def backend_for(group: torch_dist.ProcessGroup, device_type: str) -> str:
    """The backend that runs `group`'s collectives on `device_type` tensors ("gloo", "nccl", ...).
    A group may name one backend per device ("cpu:gloo,cuda:nccl")."""
    for entry in torch_dist.get_backend(group).split(","):
        device, _, backend = entry.rpartition(":")
        if not device or device == device_type:
            return backend
    return ""


def average_gradients_on_gloo(model: nn.Module) -> None:
    """Make FSDP2 average gradients over ranks on gloo, as it does on NCCL. Call after sharding, on every rank.

    FSDP2 reduce-scatters fp32/bf16 gradients with ReduceOp.AVG and divides by nothing else. The gloo of
    torch 2.7 has no AVG reduce-scatter and silently sums instead (pytorch/pytorch#162338; torch 2.11's gloo
    averages), so on CPU every gradient came out world-size times too large: a wrong grad norm, and Adam
    moments of another scale than a run at another rank count accumulates. NCCL averages and is left alone.
    """
    modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
    sharded = next((p for p in model.parameters() if isinstance(p, DTensor)), None)
    if not modules or sharded is None:
        return
    mesh = sharded.device_mesh
    shard_group = mesh.get_group(mesh.ndim - 1)  # FSDP shards over the last mesh dimension (HSDP: replicate, shard)
    if backend_for(shard_group, mesh.device_type) != "gloo":
        return
    if hasattr(FSDPModule, "set_force_sum_reduction_for_comms"):
        # Newer torch (2.11 checked): reduce with SUM and let FSDP divide by the whole data-parallel size itself
        # (HSDP's replicas included), whatever this gloo does with AVG.
        for module in modules:
            module.set_force_sum_reduction_for_comms(True)
        return
    # torch 2.6 / 2.7 have no such switch (and set_reduce_scatter_divide_factor's PreMulSum is NCCL-only: gloo
    # sums through it too). Ask the backend what its AVG reduce-scatter gives for ones on this group (1 where it
    # averages, the group size where it sums) and divide each reduced gradient shard by that, in the hook FSDP
    # runs right after the reduction (after the replica all-reduce under HSDP, which these versions do with AVG:
    # it averages, or gloo refuses it). Only fp32/bf16 gradients take the AVG path; FSDP reduces other dtypes
    # with SUM and divides them itself.
    ones = torch.ones(shard_group.size(), device=mesh.device_type)
    reduced = torch.empty(1, device=mesh.device_type)
    torch_dist.reduce_scatter_tensor(reduced, ones, op=torch_dist.ReduceOp.AVG, group=shard_group)
    excess = float(reduced.item())
    if excess == 1.0:
        return

    def divide(reduce_output: torch.Tensor) -> None:
        if reduce_output.dtype in (torch.float32, torch.bfloat16):
            reduce_output.div_(excess)

    for module in modules:
        module.set_all_reduce_hook(divide)
