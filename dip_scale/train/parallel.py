"""Parallelism, applied from outside the model: ddp, fsdp (FSDP2: ZeRO-3 / ZeRO-2 / hybrid) and the hints
Composer reads (which modules to shard, which to checkpoint), plus activation checkpointing and
torch.compile. DeepSpeed lives in train/deepspeed.py.

Units of sharding and recomputation are the DiT blocks and the detailer head, of both the live network
and its EMA copy.
"""

from __future__ import annotations

import os

from composer.utils import dist
from composer.utils.parallelism import FSDP2Config
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

from dip_scale.models.dit import DiTBlock
from dip_scale.train.config import Recipe


def shard_units(net: nn.Module) -> list[nn.Module]:
    units: list[nn.Module] = list(net.trunk.blocks)
    units.append(net.detailer if net.detailer is not None else net.final_layer)
    return units


def fsdp_config(recipe: Recipe, device_type: str) -> FSDP2Config:
    sharding = recipe.parallelism.fsdp.sharding
    mesh = None
    if sharding == "hybrid":
        from torch.distributed.device_mesh import init_device_mesh

        local = int(os.environ.get("LOCAL_WORLD_SIZE", dist.get_local_world_size()))
        nodes = dist.get_world_size() // local
        mesh = init_device_mesh("cuda" if device_type == "gpu" else "cpu", (nodes, local),
                                mesh_dim_names=("data_parallel_replicate", "data_parallel_shard"))
    return FSDP2Config(
        device_mesh=mesh,
        # ZeRO-3 frees gathered parameters after each unit's forward; ZeRO-2 keeps them until backward, so
        # only gradients and optimizer state stay sharded.
        reshard_after_forward=sharding != "grad_op",
        activation_checkpointing=recipe.train.activation_checkpointing,
        state_dict_type="sharded",
    )


def prepare(model: nn.Module, recipe: Recipe, device_type: str) -> dict | None:
    """Mark, wrap and compile the training wrapper's networks; return Composer's parallelism_config."""
    strategy = recipe.parallelism.strategy
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
        return {"fsdp": fsdp_config(recipe, device_type)}
    return None
