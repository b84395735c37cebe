"""Recipe -> typed, validated config.

A recipe is YAML; `key=value` overrides from the command line are merged on top (OmegaConf dot-list,
interpolation supported); the result is checked against the dataclasses below (an unknown key or a wrong
type is an error naming the key) and then for impossible combinations, before any model is built or any
data is touched. Field names equal the constructor arguments they feed.

    cfg = load_recipe("recipes/dip_xl_256.yaml", ["train.global_batch_size=512"])
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dip_scale.diffusion.sampler import METHODS
from dip_scale.models.dip import HEAD_KINDS, HEAD_PLACEMENTS, PRESETS

STRATEGIES = ("ddp", "fsdp", "deepspeed")
FSDP_SHARDING = ("full", "grad_op", "hybrid")  # ZeRO-3, ZeRO-2, shard within a node + replicate across
PRECISIONS = ("auto", "bf16", "fp32")


class ConfigError(ValueError):
    """A recipe problem, with the file and the key in the message."""


@dataclass
class ModelConfig:
    preset: str = "DiP-XL/16"
    """Name in dip_scale.models.PRESETS; the fields below, when set, override the preset."""
    depth: Optional[int] = None
    hidden_size: Optional[int] = None
    num_heads: Optional[int] = None
    patch_size: Optional[int] = None
    num_classes: Optional[int] = None
    detailer_head: Optional[str] = None
    """unet (the paper's head), mlp, attention or coord_mlp (the paper's ablation heads), or none (DiT-only);
    presets "DiP-XL/16-<head>" hold the ablation rows."""
    detailer_width: Optional[int] = None
    head_placement: Optional[str] = None
    """end (after the last block; the paper's choice), mid (after block depth // 2, the head's output fed back
    into the trunk) or both; presets "DiP-XL/16-mid", "DiP-XL/16-both". docs/dip.md describes each."""


@dataclass
class StreamConfig:
    remote: Optional[str] = None
    local: Optional[str] = None
    proportion: Optional[float] = None


@dataclass
class DataConfig:
    remote: Optional[str] = None
    """MDS shards: s3://bucket/prefix or a local folder. Either this or `streams`."""
    streams: Optional[list[StreamConfig]] = None
    """Several datasets mixed with proportions (each: remote, local, proportion)."""
    local: Optional[str] = None
    """Local cache folder; default a per-job folder (see dip_scale.data.job_cache_dir)."""
    image_size: list[int] = field(default_factory=lambda: [256, 256])
    """(height, width) of the stored images."""
    num_workers: int = 8
    num_canonical_nodes: Optional[int] = None
    """Fixed for the life of a run so that the order is the same on any node count."""
    shuffle: bool = True
    shuffle_seed: int = "${seed}"  # type: ignore[assignment]  # interpolated by OmegaConf


@dataclass
class OptimConfig:
    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.0


@dataclass
class RepaConfig:
    enabled: bool = False
    weight: float = 0.5
    block: int = 8
    """Align the hidden state after this many blocks."""
    encoder_path: Optional[str] = None
    """DINOv2 ViT-B/14 weights file; None = the torch hub cache ($TORCH_HOME/hub/checkpoints)."""


@dataclass
class ObjectiveConfig:
    label_dropout: float = 0.1
    repa: RepaConfig = field(default_factory=RepaConfig)


@dataclass
class TrainConfig:
    global_batch_size: int = 256
    """Images per optimizer step over all ranks; per-rank batch = global / world size."""
    device_microbatch_size: Optional[int] = None
    """Images per forward/backward on one rank; gradient accumulation makes up the rest. None = no accumulation."""
    max_steps: int = 800_800
    """Optimizer steps (5,005 steps = one ImageNet epoch at batch 256)."""
    precision: str = "auto"
    """auto (bf16 autocast on GPU, fp32 on CPU), bf16 or fp32."""
    compile: bool = False
    activation_checkpointing: bool = False
    nonfinite: str = "stop"
    """What a non-finite loss or gradient does: stop (checkpoint the last good state, exit) or skip the step."""
    device: str = "auto"
    """auto, cpu or gpu."""


@dataclass
class FSDPConfig:
    sharding: str = "full"
    """full (ZeRO-3), grad_op (ZeRO-2: gradients and optimizer state sharded) or hybrid (runs as full under
    Composer 0.32, whose FSDP2 has no replicate dimension; a warning says so)."""


@dataclass
class DeepSpeedConfig:
    stage: int = 2
    """ZeRO stage: 1 (optimizer state sharded), 2 (+ gradients) or 3 (+ parameters)."""
    offload_optimizer: bool = False
    """Keep the optimizer state (and its update) in CPU memory; stage 2 or 3."""
    param_persistence_threshold: int = 100_000
    """Stage 3: parameters with at most this many elements stay whole on every rank (DeepSpeed's
    stage3_param_persistence_threshold); saves gathering many tiny tensors."""


@dataclass
class ParallelConfig:
    strategy: str = "ddp"
    fsdp: FSDPConfig = field(default_factory=FSDPConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)


@dataclass
class CheckpointConfig:
    save_folder: Optional[str] = None
    """Local folder or s3://bucket/prefix; the run lives in <save_folder>/<run_name>. None = runs/<run_name>."""
    local_folder: Optional[str] = None
    """Where checkpoints are written before upload when save_folder is remote. None = runs/<run_name>."""
    every: int = 5000
    """Save every this many steps."""
    keep_last: int = 3
    """Keep the newest K periodic checkpoints (locally; remote ones too)."""
    milestones: list[int] = field(default_factory=list)
    """Steps whose checkpoints are never deleted."""
    resume: bool = True
    """Continue from the newest complete checkpoint of the run if there is one."""


@dataclass
class SamplerSettings:
    steps: int = 100
    method: str = "euler"
    guidance_scale: float = 1.0
    guidance_interval: list[float] = field(default_factory=lambda: [0.1, 1.0])


@dataclass
class WandbConfig:
    enabled: bool = True
    project: str = "dip_scale"
    entity: Optional[str] = None
    mode: str = "offline"
    """offline (default: nothing leaves the machine), online or disabled."""


@dataclass
class LoggingConfig:
    log_every: int = 50
    sample_every: int = 5000
    """Write a grid of EMA samples every this many steps (0 = never)."""
    sample_classes: Optional[list[int]] = None
    """Classes of the sample grid; None = 8 classes spread evenly over the label range."""
    sample_steps: int = 50
    wandb: WandbConfig = field(default_factory=WandbConfig)
    progress_bar: bool = True
    sample_ids: bool = False
    """Append the sample ids of every step to <run>/samples_seen.jsonl (each rank; for data-order checks)."""


@dataclass
class EvalConfig:
    every: int = 0
    """Evaluate the newest checkpoint every this many steps (0 = never)."""
    mode: str = "local"
    """local (in-process, small N) or slurm (submit cluster/eval_fid.sh)."""
    num_samples: int = 1000
    batch_size: int = 64
    reference: Optional[str] = None
    """ADM reference .npz, or MDS shards (local or s3://) to compute statistics from."""
    inception_path: Optional[str] = None


@dataclass
class Recipe:
    run_name: str = MISSING
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    ema_decay: float = 0.9999
    train: TrainConfig = field(default_factory=TrainConfig)
    parallelism: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    sampler: SamplerSettings = field(default_factory=SamplerSettings)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# ----------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """YAML file + `key=value` overrides -> validated Recipe. Raises ConfigError naming the file and key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe file not found: {path}")
    schema = OmegaConf.structured(Recipe)
    try:
        raw = OmegaConf.load(path)
    except Exception as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. train.global_batch_size=512)")
    try:
        merged = OmegaConf.merge(schema, raw)
        if overrides:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
        OmegaConf.resolve(merged)
        recipe: Recipe = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as err:
        raise ConfigError(_explain(path, err)) from err
    validate(recipe, source=str(path))
    return recipe


def _explain(path: Path, err: OmegaConfBaseException) -> str:
    key = getattr(err, "full_key", None) or ""
    msg = getattr(err, "msg", None) or str(err)
    first = msg.splitlines()[0] if msg else type(err).__name__
    if "Key '" in first and "not in" in first or "ConfigKeyError" in type(err).__name__:
        return f"{path}: unknown key {key!r}: {first}"
    if "MissingMandatoryValue" in type(err).__name__:
        return f"{path}: key {key!r} must be set"
    return f"{path}: bad value for {key!r}: {first}"


def _one_of(source: str, key: str, value: Any, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"{source}: {key}={value!r} is not allowed; expected one of {list(allowed)}")


def validate(recipe: Recipe, source: str = "recipe") -> None:
    """Combinations that the types cannot express. World-size checks are in check_world_size."""
    m = recipe.model
    _one_of(source, "model.preset", m.preset, sorted(PRESETS))
    if m.detailer_head is not None:
        _one_of(source, "model.detailer_head", m.detailer_head, HEAD_KINDS)
    if m.head_placement is not None:
        _one_of(source, "model.head_placement", m.head_placement, HEAD_PLACEMENTS)
    try:
        model_config(recipe)
    except ValueError as err:
        raise ConfigError(f"{source}: model: {err}") from err
    if recipe.data.remote is None and not recipe.data.streams:
        raise ConfigError(f"{source}: data.remote (s3://bucket/prefix or a local folder of MDS shards) or "
                          "data.streams must be set")
    if recipe.data.remote is not None and recipe.data.streams:
        raise ConfigError(f"{source}: set data.remote or data.streams, not both")
    if len(recipe.data.image_size) != 2:
        raise ConfigError(f"{source}: data.image_size must be [height, width], got {recipe.data.image_size}")
    patch = model_config(recipe).patch_size
    if any(s % patch for s in recipe.data.image_size):
        raise ConfigError(f"{source}: data.image_size {recipe.data.image_size} is not divisible by the model's "
                          f"patch size {patch}")
    t = recipe.train
    _one_of(source, "train.precision", t.precision, PRECISIONS)
    _one_of(source, "train.nonfinite", t.nonfinite, ("stop", "skip"))
    _one_of(source, "train.device", t.device, ("auto", "cpu", "gpu"))
    for key, value in (("train.global_batch_size", t.global_batch_size), ("train.max_steps", t.max_steps),
                       ("checkpoint.every", recipe.checkpoint.every), ("checkpoint.keep_last", recipe.checkpoint.keep_last),
                       ("logging.log_every", recipe.logging.log_every)):
        if value <= 0:
            raise ConfigError(f"{source}: {key} must be positive, got {value}")
    if t.device_microbatch_size is not None and t.device_microbatch_size <= 0:
        raise ConfigError(f"{source}: train.device_microbatch_size must be positive or null")
    p = recipe.parallelism
    _one_of(source, "parallelism.strategy", p.strategy, STRATEGIES)
    _one_of(source, "parallelism.fsdp.sharding", p.fsdp.sharding, FSDP_SHARDING)
    _one_of(source, "parallelism.deepspeed.stage", p.deepspeed.stage, (1, 2, 3))
    if p.deepspeed.offload_optimizer and p.strategy == "deepspeed" and p.deepspeed.stage == 1:
        raise ConfigError(f"{source}: parallelism.deepspeed.offload_optimizer needs stage 2 or 3")
    if p.deepspeed.param_persistence_threshold < 0:
        raise ConfigError(f"{source}: parallelism.deepspeed.param_persistence_threshold must be >= 0")
    if not 0.0 <= recipe.ema_decay < 1.0:
        raise ConfigError(f"{source}: ema_decay must be in [0, 1), got {recipe.ema_decay}")
    if not 0.0 <= recipe.objective.label_dropout < 1.0:
        raise ConfigError(f"{source}: objective.label_dropout must be in [0, 1)")
    r = recipe.objective.repa
    if r.enabled and not 1 <= r.block <= model_config(recipe).depth:
        raise ConfigError(f"{source}: objective.repa.block={r.block} must be within the model's "
                          f"{model_config(recipe).depth} blocks")
    s = recipe.sampler
    _one_of(source, "sampler.method", s.method, METHODS)
    if len(s.guidance_interval) != 2 or not 0 <= s.guidance_interval[0] <= s.guidance_interval[1] <= 1:
        raise ConfigError(f"{source}: sampler.guidance_interval must be [lo, hi] with 0 <= lo <= hi <= 1")
    num_classes = model_config(recipe).num_classes
    bad = [c for c in recipe.logging.sample_classes or [] if not 0 <= c < num_classes]
    if bad:
        raise ConfigError(f"{source}: logging.sample_classes {bad} are outside [0, {num_classes})")
    _one_of(source, "logging.wandb.mode", recipe.logging.wandb.mode, ("offline", "online", "disabled"))
    _one_of(source, "eval.mode", recipe.eval.mode, ("local", "slurm"))
    if recipe.eval.every and recipe.eval.num_samples % num_classes:
        raise ConfigError(f"{source}: eval.num_samples={recipe.eval.num_samples} must be divisible by the "
                          f"{num_classes} classes (class-balanced evaluation)")


def model_config(recipe: Recipe):
    """The DiPConfig the recipe asks for: the preset with the recipe's non-null fields on top."""
    from dip_scale.models.dip import PRESETS as presets

    fields = {k: v for k, v in dataclasses.asdict(recipe.model).items() if k != "preset" and v is not None}
    return dataclasses.replace(presets[recipe.model.preset], **fields)


def check_world_size(recipe: Recipe, world_size: int) -> tuple[int, int]:
    """Per-rank batch and gradient-accumulation steps for this world size (error if it does not divide)."""
    g = recipe.train.global_batch_size
    if g % world_size:
        raise ConfigError(f"train.global_batch_size={g} is not divisible by the world size {world_size}; "
                          f"choose a global batch that is a multiple of {world_size}")
    per_rank = g // world_size
    micro = recipe.train.device_microbatch_size or per_rank
    if per_rank % micro:
        raise ConfigError(f"per-rank batch {per_rank} (global {g} / {world_size} ranks) is not divisible by "
                          f"train.device_microbatch_size={micro}")
    return per_rank, per_rank // micro


def to_yaml(recipe: Recipe) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(recipe))
