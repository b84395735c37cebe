"""The one place that turns a validated Recipe into objects: model, data, optimizer, callbacks, loggers,
and the Composer Trainer that runs them."""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from composer import Trainer
from composer.utils import dist

from dip_scale.checkpoint import fetch_checkpoint, resume_candidates
from dip_scale.data.streaming import build_dataloader as build
from dip_scale.diffusion.ema import local_tensors
from dip_scale.diffusion.flow import FlowMatching
from dip_scale.diffusion.repa import REPA, load_repa_encoder
from dip_scale.diffusion.sampler import SamplerConfig
from dip_scale.eval.grid import default_classes
from dip_scale.models.dip import build_model
from dip_scale.recipe import ConfigError, Recipe, check_world_size, model_config, stall_timeout, to_yaml
from dip_scale.storage import StoreUnavailable, atomic_write, is_remote, open_store
from dip_scale.train import parallel
from dip_scale.train.callbacks.checkpoint import CheckpointSaver
from dip_scale.train.callbacks.ema import EMAUpdate
from dip_scale.train.callbacks.epoch_seed import EpochSeed
from dip_scale.train.callbacks.fid_eval import ScheduledEval
from dip_scale.train.callbacks.metrics import TrainMetrics
from dip_scale.train.callbacks.nonfinite import NonFiniteGuard
from dip_scale.train.callbacks.preemption import PreemptionCheckpoint
from dip_scale.train.callbacks.sample_grid import SampleGrid
from dip_scale.train.callbacks.sample_log import SampleLog
from dip_scale.train.loggers import wandb_logger
from dip_scale.train.module import DiPComposerModel
from dip_scale.train.optim import GuardedAdamW, use_fused_adamw

log = logging.getLogger(__name__)


@dataclass
class RunPaths:
    local_root: Path
    """Checkpoints, metrics, samples and the saved config of this run on this machine."""
    remote: str | None
    """s3://.../<run_name> when the save folder is remote."""


def run_paths(recipe: Recipe) -> RunPaths:
    c = recipe.checkpoint
    if c.save_folder and is_remote(c.save_folder):
        local = Path(c.local_folder or "runs") / recipe.run_name
        return RunPaths(local, f"{c.save_folder.rstrip('/')}/{recipe.run_name}")
    return RunPaths(Path(c.save_folder or "runs") / recipe.run_name, None)


def device_type(recipe: Recipe) -> str:
    if recipe.train.device == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    if recipe.train.device == "gpu" and not torch.cuda.is_available():
        raise ConfigError("train.device=gpu but no CUDA device is visible")
    return recipe.train.device


def precision(recipe: Recipe, device: str) -> str:
    p = recipe.train.precision
    if p == "auto":
        return "amp_bf16" if device == "gpu" else "fp32"
    if p == "bf16" and device == "cpu":
        raise ConfigError("train.precision=bf16 needs a GPU (Composer allows only fp32 on CPU); use auto or fp32")
    return "amp_bf16" if p == "bf16" else "fp32"


def load_repa(recipe: Recipe, hidden_size: int):
    r = recipe.objective.repa
    if not r.enabled:
        return None
    try:
        encoder = load_repa_encoder(r.encoder_path)
    except FileNotFoundError as err:
        raise ConfigError(f"objective.repa: {err}") from err
    return REPA(hidden_size, encoder, weight=r.weight)


def build_dataloader(recipe: Recipe, per_rank_batch: int):
    d = recipe.data
    streams = [dict(remote=s.remote, local=s.local, proportion=s.proportion) for s in d.streams] if d.streams else None
    return build(remote=d.remote, local=d.local, streams=streams, batch_size=per_rank_batch, shuffle=d.shuffle,
                 shuffle_seed=d.shuffle_seed, num_canonical_nodes=d.num_canonical_nodes, num_workers=d.num_workers,
                 output="uint8", return_index=True, download_retry=d.download_retry,
                 download_timeout=d.download_timeout, stall_timeout=stall_timeout(recipe))


def resolve_resume(recipe: Recipe, paths: RunPaths) -> tuple[int, str] | None:
    """The newest checkpoint every node can read, agreed by all ranks; each node fetches it for itself.

    Raises StoreUnavailable on every rank when the store cannot be reached (better no start than one from
    scratch), and ConfigError when the nodes disagree: a checkpoint that some nodes have and others cannot
    read means their save folders are not one folder (node-local disks without a remote store), and a
    start from an older checkpoint, or from scratch, would silently lose training."""
    if not recipe.checkpoint.resume:
        return None
    store = open_store(paths.remote) if paths.remote else None
    lead = dist.get_local_rank() == 0  # lists and fetches for its node
    nodes = dist.get_world_size() // dist.get_local_world_size()

    def on_every_rank(results: list) -> list:
        # A store that is unreachable for one rank stops them all (instead of leaving the others waiting).
        if errors := [r[-1] for r in results if r[-1]]:
            raise StoreUnavailable(errors[0])
        return results

    seen, error = [], None
    if lead:
        try:
            seen = resume_candidates(paths.local_root, store if dist.get_global_rank() == 0 else None)
        except StoreUnavailable as err:
            error = str(err)
    listed = on_every_rank(dist.all_gather_object((lead, dist.get_node_rank(), seen, error)))
    candidates = sorted({s for is_lead, _, steps, _ in listed if is_lead for s in steps}, reverse=True)
    for step in candidates:
        # Node after node: where the nodes share the folder, the first fetch serves the others.
        path, error = None, None
        for node in range(nodes):
            if lead and dist.get_node_rank() == node:
                try:
                    path = fetch_checkpoint(paths.local_root, store, step)
                except StoreUnavailable as err:
                    error = str(err)
            dist.barrier()
        gathered = on_every_rank(dist.all_gather_object((lead, dist.get_node_rank(), path, error)))
        fetched = {node: p for is_lead, node, p, _ in gathered if is_lead}  # node -> its own load path
        if all(p is not None for p in fetched.values()):
            return step, fetched[dist.get_node_rank()]
        if store is None and any(p is not None for p in fetched.values()):
            have = sorted(n for n, p in fetched.items() if p is not None)
            lack = sorted(n for n, p in fetched.items() if p is None)
            raise ConfigError(
                f"checkpoint.save_folder={recipe.checkpoint.save_folder or 'runs'}: node(s) {have} have the checkpoint "
                f"of step {step} in {paths.local_root}, node(s) {lack} cannot read it there. The nodes do not share "
                "this folder (node-local disks?), so resuming would lose training. Use an s3:// save folder or a "
                "folder on a file system that every node mounts; not starting")
    return None


def build_trainer(recipe: Recipe) -> tuple[Trainer, RunPaths]:
    device = device_type(recipe)
    prec = precision(recipe, device)
    world = dist.get_world_size()
    per_rank, _ = check_world_size(recipe, world)
    net_config = model_config(recipe)
    repa = load_repa(recipe, net_config.hidden_size)
    paths = run_paths(recipe)

    torch.manual_seed(recipe.seed)  # identical initial weights on every rank
    net = build_model(net_config)
    flow = FlowMatching(num_classes=net_config.num_classes, label_dropout=recipe.objective.label_dropout)
    model = DiPComposerModel(net, flow, seed=recipe.seed, repa=repa, repa_block=recipe.objective.repa.block)
    parallelism = parallel.prepare(model, recipe, prec)

    ds = None
    if recipe.parallelism.strategy == "deepspeed":
        from dip_scale.train.deepspeed import initialize

        ds = initialize(model, recipe, device)  # the engine, and the model/optimizer/writer Composer drives
        optimizer = ds.optimizer
    else:
        o = recipe.optim
        trainable = [p for n, p in model.named_parameters() if p.requires_grad]
        fused = use_fused_adamw(device, recipe.parallelism.strategy) or None  # None: torch's default path
        optimizer = GuardedAdamW(trainable, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay,
                                 fused=fused, max_grad_norm=o.grad_clip)

    if dist.get_local_rank() == 0:  # every node: its folder may be its own (node-local disks)
        paths.local_root.mkdir(parents=True, exist_ok=True)
        atomic_write(paths.local_root / "config.yaml", to_yaml(recipe))
    dist.barrier()
    resume = resolve_resume(recipe, paths)
    if resume is not None and resume[0] >= recipe.train.max_steps:
        log.warning("run %s is already complete at step %d (%s): nothing to train", recipe.run_name, resume[0],
                    paths.remote or paths.local_root)
    elif resume is not None:
        log.warning("resuming %s from step %d (%s)", recipe.run_name, resume[0], resume[1])
        if ds is not None:
            ds.load(resume[1])  # weights, EMA and optimizer; Composer's load_path brings the rest

    c = recipe.checkpoint
    saver = CheckpointSaver(paths.local_root, open_store(paths.remote) if paths.remote else None, every=c.every,
                            keep_last=c.keep_last, milestones=c.milestones, config_yaml=to_yaml(recipe),
                            writer=ds.writer if ds else None)
    image_size = tuple(recipe.data.image_size)
    sampler = recipe.sampler
    loader = build_dataloader(recipe, per_rank)
    preemption = PreemptionCheckpoint(saver)
    loader.should_stop = preemption.stop_requested  # a signal ends any wait for data
    classes = recipe.logging.sample_classes or default_classes(net_config.num_classes)
    callbacks = [
        EpochSeed(model),
        EMAUpdate(model, recipe.ema_decay, tensors=ds.ema_tensors if ds else local_tensors),
        TrainMetrics(net_config, image_size, recipe.train.global_batch_size, recipe.logging.log_every,
                     paths.local_root, recipe.train.max_steps),
        saver,
        NonFiniteGuard(recipe.train.nonfinite, saver),
        preemption,
    ]
    if recipe.logging.sample_ids:  # first: the steps that end in a checkpoint and an exit are recorded too
        callbacks.insert(0, SampleLog(paths.local_root))
    if recipe.logging.sample_every:
        callbacks.append(SampleGrid(model, recipe.logging.sample_every, sorted(set(classes)), image_size,
                                    sampler.merged(steps=recipe.logging.sample_steps),
                                    paths.local_root, seed=recipe.seed))
    if recipe.eval.every:
        callbacks.append(scheduled_eval(recipe, paths, sampler, saver))
    where = paths.remote or str(paths.local_root.resolve())
    loggers = [lg for lg in [wandb_logger(recipe, where, str(paths.local_root))] if lg is not None]

    trainer = Trainer(
        model=ds.model if ds else model,
        train_dataloader=loader,
        max_duration=f"{recipe.train.max_steps}ba",
        optimizers=optimizer,
        schedulers=warmup(recipe),
        device=device,
        precision=prec,
        device_train_microbatch_size=recipe.train.device_microbatch_size or per_rank,
        parallelism_config=parallelism,
        callbacks=callbacks,
        loggers=loggers,
        run_name=recipe.run_name,
        seed=recipe.seed,
        load_path=resume[1] if resume else None,
        progress_bar=recipe.logging.progress_bar and sys.stdout.isatty(),  # a log file gets metric lines
        log_to_console=False,
        save_folder=None,
        python_log_level=None,
    )
    parallel.after_trainer(trainer.state.model, model, recipe)  # DDP-wrapped, or sharded in place, by now
    return trainer, paths


def warmup(recipe: Recipe):
    """optim.warmup_steps as Composer's scheduler (a function of the step: resumes continue the ramp), or None."""
    if not recipe.optim.warmup_steps:
        return None
    from composer.optim import ConstantWithWarmupScheduler

    return ConstantWithWarmupScheduler(t_warmup=f"{recipe.optim.warmup_steps}ba")


def scheduled_eval(recipe: Recipe, paths: RunPaths, sampler: SamplerConfig, saver: CheckpointSaver):
    e = recipe.eval
    return ScheduledEval(every=e.every, mode=e.mode, num_samples=e.num_samples, batch_size=e.batch_size,
                         reference=e.reference, inception_path=e.inception_path, sampler=sampler,
                         run_dir=paths.local_root, seed=recipe.seed, image_size=tuple(recipe.data.image_size),
                         script=e.script, classifier_path=e.classifier, saver=saver)
