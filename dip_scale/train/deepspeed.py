"""DeepSpeed ZeRO stages 1-3 (optionally with the optimizer state offloaded to CPU) under the Composer Trainer.

Composer removed its DeepSpeed support in 0.28; this file is the whole integration against 0.32.1. The recipe,
callbacks, logging and checkpoint format are the ones every strategy uses; only the four places below differ.

How Composer's training step drives the engine. Per batch, Composer 0.32.1 calls `optimizer.zero_grad()` and
then `optimizer.step(closure)`, where the closure runs each micro-batch as `model(batch)`, `model.loss(...)`,
`loss["total"] *= micro / batch`, `loss["total"].backward()`.
  forward   The Trainer's model is `DeepSpeedModel`, a ComposerModel whose forward is `engine(batch)`: ZeRO-3
            gathers parameters in module hooks and engine.forward prepares the engine's backward bookkeeping.
            It keeps the engine off its module tree and so owns no parameters: Composer neither wraps it in
            DDP (it does so for any model with trainable parameters and no FSDP) nor puts weights in its
            checkpoint; the engine holds and saves them.
  backward  The hook is the loss tensor. `DeepSpeedModel.loss` returns the wrapped model's losses with "total"
            re-typed as `_EngineLoss`, a Tensor whose only difference is that `.backward()` is
            `engine.backward(...)`. Composer's own `microbatch_loss.backward()` thus runs engine.backward, after
            Composer's micro-batch scaling (so `scale_wrt_gas=False`) and exactly where it always runs.
            Rejected: a Trainer subclass (the call sits inside the 140-line `_train_microbatch`, which would be
            copied and would drift from Composer), and an Event callback calling engine.backward itself
            (BEFORE_BACKWARD fires before Composer scales the loss, AFTER_BACKWARD after Composer's backward).
  step      `EngineOptimizer` is the optimizer Composer sees. `step(closure)` runs the closure (the engine
            accumulates gradients over the micro-batches: `managed_gradient_accumulation: false`), then
            `engine.step()` reduces, checks, updates with torch's AdamW (`torch_adam`: nothing is compiled) and
            clears the gradients. DeepSpeed itself skips a step whose global gradient norm is not finite; that
            and the norm are reported as GuardedAdamW reports them, for NonFiniteGuard, EMAUpdate and metrics.
  checkpoint  `DeepSpeedWriter` is CheckpointSaver's writer: `engine.save_checkpoint` (each rank its own
            partition) into `step-N.tmp/deepspeed/`, and Composer's own state (timestamp, data position,
            callbacks, RNG of every rank) without model and optimizer into `state.pt` on rank 0. The saver
            adds the manifest. `load_checkpoint` restores the engine (on another number of ranks through
            DeepSpeed's universal checkpoint format); Composer loads `state.pt` (load_path).
            dip_scale.checkpoint reads the whole weights and EMA back without a process group, for sampling
            and evaluation.

Precision: mixed precision is Composer's autocast (train.precision bf16 -> amp_bf16), as under ddp and fsdp,
and the engine itself runs in fp32 (master weights, gradients, reductions). DeepSpeed's own bf16 mode casts
every module parameter to bf16, the EMA included, where a step of (1 - 0.9999) x (live - ema) is below bf16
resolution and the EMA stops moving.

EMA: `ema_net` is part of the engine's module, so ZeRO-3 partitions it exactly like `net` (same shapes, same
partition of every tensor) and saves and loads its partitions with the rest; `ema_tensors` gives EMAUpdate
this rank's storage of either network. Under ZeRO-3 the EMA network is sampled from like any partitioned
module: its parameters are gathered in the same hooks, on every rank.

    composer -n 8 -m dip_scale.train recipes/dip_xl_256.yaml parallelism.strategy=deepspeed \\
        parallelism.deepspeed.stage=3
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from composer.models import ComposerModel
from composer.utils import dist
from composer.utils.checkpoint import save_checkpoint
from torch import nn

from dip_scale.checkpoint import read_weights
from dip_scale.diffusion.ema import local_tensors
from dip_scale.recipe import Recipe, check_world_size

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "deepspeed"
"""Sub-folder of a checkpoint that holds the engine's files (`<tag>/...`)."""
TAG = "zero"
UNIVERSAL_TAG = "zero_universal"
"""The same checkpoint in DeepSpeed's universal format, made when it is loaded on another number of ranks."""
COMPOSER_STATE = "state.pt"


# ----------------------------------------------------------------------------------------------------
# Engine
# ----------------------------------------------------------------------------------------------------


def ds_config(recipe: Recipe, world_size: int, device_type: str) -> dict:
    """The DeepSpeed config for this recipe and world size."""
    per_rank, accum = check_world_size(recipe, world_size)
    d, o = recipe.parallelism.deepspeed, recipe.optim
    zero: dict = {"stage": d.stage}
    if d.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": device_type == "gpu"}
    if d.stage == 3:
        zero["stage3_param_persistence_threshold"] = d.param_persistence_threshold
    config = {
        "train_batch_size": recipe.train.global_batch_size,
        "train_micro_batch_size_per_gpu": per_rank // accum,
        "gradient_accumulation_steps": accum,
        # Composer runs the micro-batches and calls step once per batch: the engine accumulates until step().
        "managed_gradient_accumulation": False,
        "optimizer": {"type": "AdamW", "params": {"lr": o.lr, "betas": list(o.betas), "eps": o.eps,
                                                  "weight_decay": o.weight_decay, "torch_adam": True}},
        "zero_optimization": zero,
        "gradient_clipping": float(o.grad_clip),
    }
    if recipe.parallelism.reduce_dtype == "bf16":
        config["communication_data_type"] = "bf16"  # gradient reductions in bf16; master weights stay fp32
    return config


def initialize(model: nn.Module, recipe: Recipe, device_type: str) -> DeepSpeedRun:
    """Wrap the DiPComposerModel in a DeepSpeed engine and return what build.py hands to Composer."""
    if device_type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before DeepSpeed picks its accelerator
    import deepspeed

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    if device_type == "cpu":
        # On CPU DeepSpeed's comm layer would JIT-compile a shared-memory all-reduce kernel (for inference,
        # minutes of C++): mark it unavailable, so that gloo does all the communication.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    # Composer has set up torch.distributed; DeepSpeed's comm layer wraps that process group.
    deepspeed.init_distributed(dist_backend="gloo" if device_type == "cpu" else "nccl")
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=trainable,
                                           config=ds_config(recipe, dist.get_world_size(), device_type))
    return DeepSpeedRun(engine, DeepSpeedModel(engine), EngineOptimizer(engine), DeepSpeedWriter(engine),
                        ema_tensors if recipe.parallelism.deepspeed.stage == 3 else local_tensors)


@dataclass
class DeepSpeedRun:
    engine: nn.Module
    model: ComposerModel
    """The Trainer's model."""
    optimizer: EngineOptimizer
    """The Trainer's optimizer."""
    writer: DeepSpeedWriter
    """CheckpointSaver's writer."""
    ema_tensors: object
    """EMAUpdate's `tensors`."""

    def load(self, state_file: str) -> None:
        load_checkpoint(self.engine, Path(state_file).parent)


# ----------------------------------------------------------------------------------------------------
# Forward and backward
# ----------------------------------------------------------------------------------------------------


class _EngineLoss(torch.Tensor):
    """The loss Composer backpropagates: the same tensor (data and graph), with `.backward()` routed through
    the engine. Other tensor operations return plain tensors, so nothing else changes type."""

    __torch_function__ = torch._C._disabled_torch_function_impl
    engine = None

    @classmethod
    def wrap(cls, loss: torch.Tensor, engine) -> _EngineLoss:
        out = loss.as_subclass(cls)  # aliases `loss` and stays attached to its graph
        out.engine = engine
        return out

    def backward(self, gradient=None, retain_graph=None, create_graph=False, inputs=None):
        if gradient is not None or create_graph or inputs is not None:
            raise NotImplementedError("DeepSpeed backpropagates a scalar loss only")
        # Composer has already scaled the loss for its micro-batches.
        self.engine.backward(self.as_subclass(torch.Tensor), retain_graph=bool(retain_graph), scale_wrt_gas=False)


class DeepSpeedModel(ComposerModel):
    """The ComposerModel the Trainer drives: forward through the engine, the wrapped model's loss."""

    def __init__(self, engine):
        super().__init__()
        object.__setattr__(self, "engine", engine)  # not a submodule: see the module docstring

    def forward(self, batch):
        return self.engine(batch)

    def loss(self, outputs, batch):
        losses = self.engine.module.loss(outputs, batch)
        losses["total"] = _EngineLoss.wrap(losses["total"], self.engine)
        return losses

    def train(self, mode: bool = True):
        super().train(mode)
        self.engine.train(mode)
        return self


class EngineOptimizer:
    """What Composer steps. Gradients, optimizer state and the update all live in the engine."""

    def __init__(self, engine):
        self.engine = engine
        self.state: dict = {}  # Composer moves optimizer state to the device; the engine's is already there
        self.last_grad_norm = 0.0
        self.last_step_skipped = False
        self.skipped_steps = 0

    @property
    def param_groups(self) -> list[dict]:
        return self.engine.optimizer.param_groups  # lr, betas, ... for logging

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Nothing to do: engine.step() leaves the gradients cleared."""

    def step(self, closure=None):
        loss = closure() if closure is not None else None
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        self.last_grad_norm = float("nan") if norm is None else float(norm)
        # Non-finite gradients: DeepSpeed left weights and moments untouched (on every rank: the norm is global).
        self.last_step_skipped = not self.engine.was_step_applied()
        self.skipped_steps += int(self.last_step_skipped)
        return loss


# ----------------------------------------------------------------------------------------------------
# EMA under ZeRO-3
# ----------------------------------------------------------------------------------------------------


def ema_tensors(module: nn.Module) -> list[torch.Tensor]:
    """This rank's storage of each parameter of `module` (ZeRO-3): its partition `ds_tensor` and, for the small
    parameters ZeRO-3 keeps whole on every rank (`ds_persist`), also the whole tensor that forward reads.

    `net` and `ema_net` have the same shapes, so both lists line up element for element; the EMA is
    elementwise, so the whole copy and the partition of a persistent parameter stay equal."""
    params = list(module.parameters())
    return [p.ds_tensor for p in params] + [p.data for p in params if getattr(p, "ds_persist", False)]


# ----------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _without(state, *attributes: str):
    """Composer's state minus some attributes (the engine saves the weights and the optimizer)."""
    saved = state.serialized_attributes
    state.serialized_attributes = [a for a in saved if a not in attributes]
    try:
        yield
    finally:
        state.serialized_attributes = saved


class DeepSpeedWriter:
    """Writes a checkpoint's contents into `tmp` for CheckpointSaver; returns (files this rank wrote, load)."""

    def __init__(self, engine):
        self.engine = engine

    def write(self, state, tmp: Path) -> tuple[list[str], str]:
        rank = dist.get_global_rank()
        self.engine.save_checkpoint(str(tmp / CHECKPOINT_DIR), tag=TAG, save_latest=False)  # ends with a barrier
        with _without(state, "model", "optimizers"):
            save_checkpoint(state, str(tmp / COMPOSER_STATE))  # rank 0 writes; every rank's RNG; barrier
        # DeepSpeed names every per-rank file zero_pp_rank_<data-parallel rank>_...; the rest is rank 0's.
        mine = []
        for path in sorted((tmp / CHECKPOINT_DIR).rglob("*")):
            if not path.is_file():
                continue
            owner = re.search(r"zero_pp_rank_(\d+)_", path.name)
            if (int(owner.group(1)) if owner else 0) == rank:
                mine.append(str(path.relative_to(tmp)))
        if rank == 0:
            mine.append(COMPOSER_STATE)
        return mine, COMPOSER_STATE


def load_checkpoint(engine, folder: Path) -> None:
    """Restore weights, EMA and optimizer state of every rank from a checkpoint folder (step-N/).

    ZeRO partitions belong to the rank count that wrote them. On another rank count (a requeue onto fewer or
    more nodes) the checkpoint is first converted to DeepSpeed's universal format (one file per parameter and
    optimizer moment, `deepspeed/zero_universal/` next to the original, written once and kept), which loads
    onto any partitioning."""
    manifest = json.loads((folder / "manifest.json").read_text())
    saved, now = manifest.get("world_size"), dist.get_world_size()
    tag = TAG
    if saved != now:
        log.warning("checkpoint %s was written by %s DeepSpeed ranks and is loaded on %d: through DeepSpeed's "
                    "universal checkpoint format", folder, saved, now)
        tag = to_universal(folder / CHECKPOINT_DIR)
    engine._config.load_universal_checkpoint = tag == UNIVERSAL_TAG  # read by load_checkpoint only
    try:
        path, _ = engine.load_checkpoint(str(folder / CHECKPOINT_DIR), tag=tag, load_module_strict=True,
                                         load_optimizer_states=True, load_lr_scheduler_states=False)
    finally:
        engine._config.load_universal_checkpoint = False
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load {folder / CHECKPOINT_DIR}")
    if tag == UNIVERSAL_TAG:
        _restore_frozen(engine, folder)


def _restore_frozen(engine, folder: Path) -> None:
    """A universal load restores what the optimizer holds (weights and moments of trainable parameters) and
    leaves frozen parameters, the EMA, as they were built: put them back from the original checkpoint. Rank 0
    reads them; under ZeRO-3 GatheredParameters repartitions its values, below it they are broadcast."""
    import deepspeed

    frozen = [(name, p) for name, p in engine.module.named_parameters() if not p.requires_grad]
    if not frozen:
        return
    rank0 = dist.get_global_rank() == 0
    weights = read_weights(folder, trust=True)[0] if rank0 else {}  # our own run's checkpoint
    with deepspeed.zero.GatheredParameters([p for _, p in frozen], modifier_rank=0):
        if rank0:
            with torch.no_grad():
                for name, p in frozen:
                    p.data.copy_(weights[name.replace("_checkpoint_wrapped_module.", "")].view_as(p.data))
    if engine.zero_optimization_stage() < 3:
        for _, p in frozen:
            dist.broadcast(p.data, src=0)


def to_universal(engine_dir: Path) -> str:
    """Convert `engine_dir/zero` into `engine_dir/zero_universal` unless that exists; returns the tag to load.
    Node after node, each node's first rank: where the nodes share the folder, the first conversion serves all."""
    from argparse import Namespace

    from deepspeed.checkpoint import ds_to_universal

    out = engine_dir / UNIVERSAL_TAG
    error = None
    for node in range(dist.get_world_size() // dist.get_local_world_size()):
        if dist.get_local_rank() == 0 and dist.get_node_rank() == node and not out.is_dir() and error is None:
            tmp = engine_dir / f"{UNIVERSAL_TAG}.tmp"
            try:
                shutil.rmtree(tmp, ignore_errors=True)
                # One worker: no process pool forked from a rank that holds a process group.
                ds_to_universal.main(Namespace(input_folder=str(engine_dir / TAG), output_folder=str(tmp),
                                               num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False,
                                               strict=True, inject_missing_state=True))
                tmp.rename(out)
            except Exception as err:  # noqa: BLE001  (every rank must hear of it, or the others wait forever)
                error = f"converting {engine_dir / TAG} to DeepSpeed's universal format failed: {err!r}"
        dist.barrier()
    errors = [e for e in dist.all_gather_object(error) if e]
    if errors:
        raise RuntimeError(errors[0])
    return UNIVERSAL_TAG
