"""Parallelism, applied from outside the model: ddp, fsdp (FSDP2: ZeRO-3 / ZeRO-2 / hybrid) and the hints
Composer reads (which modules to shard, which to checkpoint), plus activation checkpointing, torch.compile and
the dtype of the gradient reduction. DeepSpeed lives in train/deepspeed.py.

Units of sharding and recomputation are the DiT blocks and the heads (or the DiT final layer), of both the
live network and its EMA copy.

Hybrid sharding (HSDP) shards within a group of ranks and replicates across groups: a 2-D device mesh
(replicas, ranks per replica), by default (nodes, ranks per node), so that the parameter all-gathers and
gradient reduce-scatters of every layer stay on a node's fast links and only one all-reduce of the already
sharded gradients per step crosses nodes. Composer 0.32 builds the mesh itself from the config's
`data_parallel_replicate_degree`, which its FSDP2Config always answers with None; `HybridFSDP2Config` answers
with the number of replicas. Checkpoints are then written by the first replica only (one copy of every shard),
and load onto any mesh (torch.distributed.checkpoint reshards).
"""

from __future__ import annotations

import functools
import inspect
import logging
from dataclasses import dataclass

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
from dip_scale.recipe import ConfigError, Recipe

log = logging.getLogger(__name__)


def shard_units(net: nn.Module) -> list[nn.Module]:
    units: list[nn.Module] = list(net.trunk.blocks)
    return units + [m for m in (net.mid_detailer, net.detailer, net.final_layer) if m is not None]


# ----------------------------------------------------------------------------------------------------
# FSDP2
# ----------------------------------------------------------------------------------------------------


class FSDPConfig(FSDP2Config):
    """Composer's FSDP2Config with the shards of a checkpoint in `sharded/` (dip_scale.checkpoint's layout)."""

    @property
    def sharded_ckpt_prefix_dir(self) -> str:
        return "sharded"


@dataclass
class HybridFSDP2Config(FSDPConfig):
    """FSDPConfig with a replicate dimension: Composer's State builds the (replicas, world / replicas) mesh."""

    replicas: int = 1

    @property
    def data_parallel_replicate_degree(self) -> int:
        return self.replicas


def hybrid_replicas(recipe: Recipe, world_size: int, ranks_per_node: int) -> int:
    """The outer (replicate) dimension of the hybrid mesh: the recipe's, else one replica per node."""
    replicas = recipe.parallelism.fsdp.replicas or max(1, world_size // ranks_per_node)
    if world_size % replicas:
        raise ConfigError(f"parallelism.fsdp.replicas={replicas} does not divide the world size {world_size}")
    return replicas


def fsdp_config(recipe: Recipe, precision: str) -> FSDP2Config:
    sharding = recipe.parallelism.fsdp.sharding
    common = {
        # ZeRO-3 frees gathered parameters after each unit's forward; ZeRO-2 keeps them until backward, so
        # only gradients and optimizer state stay sharded.
        "reshard_after_forward": sharding != "grad_op",
        "activation_checkpointing": recipe.train.activation_checkpointing,
        "state_dict_type": "sharded",
    }
    if recipe.parallelism.reduce_dtype == "bf16":
        # Composer's DEFAULT policy, except that gradients are reduce-scattered (and, hybrid, all-reduced) in bf16.
        common["mixed_precision"] = {"param_dtype": precision, "reduce_dtype": "bf16", "buffer_dtype": precision}
    if sharding == "hybrid":
        world = dist.get_world_size()
        replicas = hybrid_replicas(recipe, world, dist.get_local_world_size())
        log.info("hybrid sharding: mesh of %d replicas x %d ranks", replicas, world // replicas)
        return HybridFSDP2Config(replicas=replicas, **common)
    return FSDPConfig(**common)


# ----------------------------------------------------------------------------------------------------
# Before and after the Trainer
# ----------------------------------------------------------------------------------------------------


def prepare(model: nn.Module, recipe: Recipe, precision: str) -> dict | None:
    """Mark, wrap and compile the training wrapper's networks; return Composer's parallelism_config.
    `precision` is Composer's (fp32, amp_bf16)."""
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
            unit.compile(backend=recipe.train.compile_backend)
    if strategy == "fsdp":
        return {"fsdp": fsdp_config(recipe, precision)}
    return None


def register_forward_methods(model: nn.Module) -> None:
    """Let FSDP2 gather parameters around net.forward_with_hidden too. Call after sharding, on every rank.

    FSDP2 unshards a module's own parameters (here the embedders and the mid head's feedback, which no unit
    below `net` holds) in hooks around forward() only; the training wrapper calls forward_with_hidden when
    REPA is on. Without FSDP this does nothing."""
    register_fsdp_forward_method(model.net, "forward_with_hidden")


def after_trainer(trainer_model: nn.Module, model: nn.Module, recipe: Recipe) -> None:
    """What needs the model as the Trainer wrapped it (DDP) or sharded it in place (FSDP). Call on every rank."""
    strategy = recipe.parallelism.strategy
    if strategy == "fsdp":
        average_gradients_on_gloo(model)
        register_forward_methods(model)
    # One rank has no DDP wrapper and nothing to reduce.
    if (strategy == "ddp" and recipe.parallelism.reduce_dtype == "bf16"
            and isinstance(trainer_model, nn.parallel.DistributedDataParallel)):
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        # Each bucket is divided by the world size, cast to bf16, all-reduced and cast back: half the bytes.
        trainer_model.register_comm_hook(None, default_hooks.bf16_compress_hook)


# ----------------------------------------------------------------------------------------------------
# gloo (CPU) fixes for FSDP2 on torch 2.6 / 2.7; NCCL needs none of them and is left alone
# ----------------------------------------------------------------------------------------------------


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
    if mesh.ndim == 2:
        _replica_all_reduce_on_gloo()
    # torch 2.6 / 2.7 have no such switch (and set_reduce_scatter_divide_factor's PreMulSum is NCCL-only: gloo
    # sums through it too). Ask the backend what its AVG reduce-scatter gives for ones on this group (1 where it
    # averages, the group size where it sums) and divide each reduced gradient shard by that, in the hook FSDP
    # runs right after the reduction. Only fp32/bf16 gradients take the AVG path; FSDP reduces other dtypes
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


def _replica_all_reduce_on_gloo() -> None:
    """HSDP's all-reduce across replicas, done so that torch 2.7 can run it on gloo.

    After the reduce-scatter within a replica, FSDP2 all-reduces the gradient shard across replicas with
    ReduceOp.AVG, which gloo refuses ("Cannot use ReduceOp.AVG with Gloo"), and then asserts on the CUDA event
    it records, which a CPU stream returns as None. Instead, for gloo replica groups only, FSDP2 is handed no
    replica group and an all-reduce hook that sums across replicas and divides by their number (FSDP2's own
    path for a hand-made HSDP); the hook it had (see average_gradients_on_gloo) runs after it. Installed once
    per process, at the one place that calls foreach_reduce."""
    from torch.distributed.fsdp._fully_shard import _fsdp_param_group

    original = _fsdp_param_group.foreach_reduce
    if getattr(original, "_dip_gloo_replicas", False):
        return
    signature = inspect.signature(original)

    @functools.wraps(original)
    def foreach_reduce(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        a = bound.arguments
        group = a.get("all_reduce_group")
        if (group is None or backend_for(group, a["device"].type) != "gloo" or not a["all_reduce_grads"]
                or a.get("partial_reduce_output") is not None):
            return original(*args, **kwargs)
        then = a.get("all_reduce_hook")

        def across_replicas(reduce_output: torch.Tensor) -> None:
            torch_dist.all_reduce(reduce_output, op=torch_dist.ReduceOp.SUM, group=group)
            reduce_output.div_(group.size())
            if then is not None:
                then(reduce_output)

        a["all_reduce_group"] = None
        a["all_reduce_hook"] = across_replicas
        return original(*bound.args, **bound.kwargs)

    foreach_reduce._dip_gloo_replicas = True
    _fsdp_param_group.foreach_reduce = foreach_reduce
