"""Recipe file + `key=value` overrides -> a typed, validated Recipe.

The YAML is merged over the schema (recipe/schema.py), the overrides over that (OmegaConf dot-list;
interpolation such as `${seed}` works); the model section is laid over its preset's values. The result is
checked against the dataclasses (an unknown key or a wrong type is an error naming the key), then here for
every combination the types cannot express, before any model is built or any data is touched. The recipe a
checkpoint carries (recipe.yaml) goes through the same loader.

    recipe = load_recipe("recipes/dip_xl_256.yaml", ["train.global_batch_size=512"])
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dip_scale.models.dip import PRESETS, DiPConfig
from dip_scale.recipe.schema import ModelConfig, Recipe

STRATEGIES = ("ddp", "fsdp", "deepspeed")
FSDP_SHARDING = ("full", "grad_op", "hybrid")  # ZeRO-3, ZeRO-2, shard within a node + replicate across
PRECISIONS = ("auto", "bf16", "fp32")
COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")
REDUCE_DTYPES = ("fp32", "bf16")


class ConfigError(ValueError):
    """A recipe problem, with the file and the key in the message."""


# ----------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """YAML file + `key=value` overrides -> validated Recipe. Raises ConfigError naming the file and key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe file not found: {path}")
    try:
        raw = OmegaConf.load(path)
    except Exception as err:  # noqa: BLE001  (yaml's own errors: any of several types)
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(raw, DictConfig):
        raise ConfigError(f"{path}: expected a mapping of sections (run_name, model, data, ...), got a list")
    return recipe_from(raw, overrides, source=str(path))


def load_recipe_text(text: str, source: str, overrides: list[str] | None = None) -> Recipe:
    """The same, for a recipe held as text (the recipe.yaml inside a checkpoint)."""
    try:
        raw = OmegaConf.create(text)
    except Exception as err:  # noqa: BLE001
        raise ConfigError(f"{source}: not valid YAML: {err}") from err
    return recipe_from(raw, overrides, source=source)


def recipe_from(raw: DictConfig, overrides: list[str] | None, source: str) -> Recipe:
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. train.global_batch_size=512)")
    try:
        if overrides:
            raw = OmegaConf.merge(raw, OmegaConf.from_dotlist(list(overrides)))
        merged = OmegaConf.merge(OmegaConf.structured(Recipe), raw)
        preset = merged.model.preset
        _one_of(source, "model.preset", preset, sorted(PRESETS))
        # The preset's values under the recipe's own model fields: one source per fact (DiPConfig).
        model = OmegaConf.structured(ModelConfig(**dataclasses.asdict(PRESETS[preset]), preset=preset))
        merged.model = OmegaConf.merge(model, raw.get("model") or {})
        OmegaConf.resolve(merged)
        recipe: Recipe = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as err:
        raise ConfigError(_explain(source, err)) from err
    except ValueError as err:  # a section's own check (DiPConfig, SamplerConfig): the message names the field
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"{source}: {err}") from err
    validate(recipe, source)
    return recipe


def _explain(source: str, err: OmegaConfBaseException) -> str:
    key = getattr(err, "full_key", None) or ""
    msg = getattr(err, "msg", None) or str(err)
    first = msg.splitlines()[0] if msg else type(err).__name__
    if "ConfigKeyError" in type(err).__name__ or ("Key '" in first and "not in" in first):
        return f"{source}: unknown key {key!r}: {first}"
    if "MissingMandatoryValue" in type(err).__name__:
        return f"{source}: key {key!r} must be set"
    return f"{source}: bad value for {key!r}: {first}"


def to_yaml(recipe: Recipe) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(recipe))


# ----------------------------------------------------------------------------------------------------
# Validation: the one place for everything the types cannot say
# ----------------------------------------------------------------------------------------------------


def _one_of(source: str, key: str, value: Any, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"{source}: {key}={value!r} is not allowed; expected one of {list(allowed)}")


def _positive(source: str, **values) -> None:
    for key, value in values.items():
        if value is None or value <= 0:
            raise ConfigError(f"{source}: {key.replace('__', '.')} must be positive, got {value}")


def validate(recipe: Recipe, source: str = "recipe") -> None:
    """Every combination the types cannot express. World-size checks are in check_world_size; whether the
    files and stores the recipe names exist is checked at start (train/preflight.py)."""
    net = model_config(recipe)
    d, t, c, lg, e = recipe.data, recipe.train, recipe.checkpoint, recipe.logging, recipe.eval
    if not recipe.run_name or "/" in recipe.run_name:
        raise ConfigError(f"{source}: run_name={recipe.run_name!r} must be a non-empty name without '/'")
    if recipe.seed < 0:
        raise ConfigError(f"{source}: seed must be >= 0, got {recipe.seed}")

    if d.remote is None and not d.streams:
        raise ConfigError(f"{source}: data.remote (s3://bucket/prefix or a local folder of MDS shards) or "
                          "data.streams must be set")
    if d.remote is not None and d.streams:
        raise ConfigError(f"{source}: set data.remote or data.streams, not both")
    for i, stream in enumerate(d.streams or []):
        if not stream.remote:
            raise ConfigError(f"{source}: data.streams[{i}].remote must be set (s3:// URL or local folder)")
        if stream.proportion is not None and stream.proportion <= 0:
            raise ConfigError(f"{source}: data.streams[{i}].proportion must be positive, got {stream.proportion}")
    if len(d.image_size) != 2 or min(d.image_size) <= 0:
        raise ConfigError(f"{source}: data.image_size must be [height, width], got {d.image_size}")
    if any(s % net.patch_size for s in d.image_size):
        raise ConfigError(f"{source}: data.image_size {d.image_size} is not divisible by the model's patch size "
                          f"{net.patch_size}")
    if d.num_workers < 0:
        raise ConfigError(f"{source}: data.num_workers must be >= 0, got {d.num_workers}")
    if d.num_canonical_nodes is not None:
        _positive(source, data__num_canonical_nodes=d.num_canonical_nodes)
    if d.download_retry < 0:
        raise ConfigError(f"{source}: data.download_retry must be >= 0, got {d.download_retry}")
    _positive(source, data__download_timeout=d.download_timeout)
    if d.stall_timeout is not None:
        _positive(source, data__stall_timeout=d.stall_timeout)

    o = recipe.optim
    _positive(source, optim__lr=o.lr, optim__eps=o.eps)
    if len(o.betas) != 2 or not all(0.0 <= b < 1.0 for b in o.betas):
        raise ConfigError(f"{source}: optim.betas must be [beta1, beta2] in [0, 1), got {o.betas}")
    if o.weight_decay < 0:
        raise ConfigError(f"{source}: optim.weight_decay must be >= 0, got {o.weight_decay}")
    if not o.grad_clip >= 0:
        raise ConfigError(f"{source}: optim.grad_clip must be >= 0 (0 = no clipping), got {o.grad_clip}")
    if o.warmup_steps < 0:
        raise ConfigError(f"{source}: optim.warmup_steps must be >= 0 (0 = no warm-up), got {o.warmup_steps}")
    if o.warmup_steps and recipe.parallelism.strategy == "deepspeed":
        raise ConfigError(f"{source}: optim.warmup_steps={o.warmup_steps} is not supported with "
                          "parallelism.strategy=deepspeed (its optimizer keeps its own schedule); use 0, or ddp/fsdp")
    if not 0.0 <= recipe.ema_decay < 1.0:
        raise ConfigError(f"{source}: ema_decay must be in [0, 1), got {recipe.ema_decay}")
    if not 0.0 <= recipe.objective.label_dropout < 1.0:
        raise ConfigError(f"{source}: objective.label_dropout must be in [0, 1), got {recipe.objective.label_dropout}")
    r = recipe.objective.repa
    if r.enabled and not 1 <= r.block <= net.depth:
        raise ConfigError(f"{source}: objective.repa.block={r.block} must be within the model's {net.depth} blocks")
    if r.enabled and r.weight < 0:
        raise ConfigError(f"{source}: objective.repa.weight must be >= 0, got {r.weight}")

    _one_of(source, "train.precision", t.precision, PRECISIONS)
    _one_of(source, "train.nonfinite", t.nonfinite, ("stop", "skip"))
    _one_of(source, "train.device", t.device, ("auto", "cpu", "gpu"))
    _one_of(source, "train.compile_backend", t.compile_backend, COMPILE_BACKENDS)
    _positive(source, train__global_batch_size=t.global_batch_size, train__max_steps=t.max_steps,
              checkpoint__every=c.every, checkpoint__keep_last=c.keep_last, logging__log_every=lg.log_every)
    if t.device_microbatch_size is not None:
        _positive(source, train__device_microbatch_size=t.device_microbatch_size)
    _positive(source, train__dist_timeout=t.dist_timeout)
    if d.stall_timeout is not None and d.stall_timeout >= t.dist_timeout:
        raise ConfigError(f"{source}: data.stall_timeout={d.stall_timeout:g} must be below train.dist_timeout="
                          f"{t.dist_timeout:g}: the other ranks wait for a rank that waits for its data")

    p = recipe.parallelism
    _one_of(source, "parallelism.strategy", p.strategy, STRATEGIES)
    _one_of(source, "parallelism.fsdp.sharding", p.fsdp.sharding, FSDP_SHARDING)
    _one_of(source, "parallelism.reduce_dtype", p.reduce_dtype, REDUCE_DTYPES)
    if p.fsdp.replicas is not None and p.fsdp.replicas < 1:
        raise ConfigError(f"{source}: parallelism.fsdp.replicas must be >= 1 or null, got {p.fsdp.replicas}")
    _one_of(source, "parallelism.deepspeed.stage", p.deepspeed.stage, (1, 2, 3))
    if p.deepspeed.offload_optimizer and p.strategy == "deepspeed" and p.deepspeed.stage == 1:
        raise ConfigError(f"{source}: parallelism.deepspeed.offload_optimizer needs stage 2 or 3")
    if p.deepspeed.param_persistence_threshold < 0:
        raise ConfigError(f"{source}: parallelism.deepspeed.param_persistence_threshold must be >= 0")

    if any(m <= 0 for m in c.milestones):
        raise ConfigError(f"{source}: checkpoint.milestones must be positive steps, got {c.milestones}")

    bad = [k for k in lg.sample_classes or [] if not 0 <= k < net.num_classes]
    if bad:
        raise ConfigError(f"{source}: logging.sample_classes {bad} are outside [0, {net.num_classes})")
    if lg.sample_every < 0:
        raise ConfigError(f"{source}: logging.sample_every must be >= 0 (0 = never), got {lg.sample_every}")
    if lg.sample_every:
        _positive(source, logging__sample_steps=lg.sample_steps)
    _one_of(source, "logging.wandb.mode", lg.wandb.mode, ("offline", "online", "disabled"))

    if e.every < 0:
        raise ConfigError(f"{source}: eval.every must be >= 0 (0 = never), got {e.every}")
    _one_of(source, "eval.mode", e.mode, ("local", "process", "slurm"))
    if e.every:
        _positive(source, eval__num_samples=e.num_samples, eval__batch_size=e.batch_size)
        if e.num_samples % net.num_classes:
            lo = e.num_samples // net.num_classes * net.num_classes
            raise ConfigError(f"{source}: eval.num_samples={e.num_samples} must be a multiple of the "
                              f"{net.num_classes} classes (class-balanced evaluation); e.g. {lo or net.num_classes}")
        if not e.reference:
            raise ConfigError(f"{source}: eval.every={e.every} needs eval.reference: an ADM reference .npz, MDS "
                              "shards (a folder or s3:// prefix) or an image folder")


def model_config(recipe: Recipe) -> DiPConfig:
    """The DiPConfig the recipe's model section describes (its preset with the recipe's fields on top)."""
    fields = {f.name: getattr(recipe.model, f.name) for f in dataclasses.fields(DiPConfig)}
    return DiPConfig(**fields)


def stall_timeout(recipe: Recipe) -> float:
    """data.stall_timeout, or its default: 80% of train.dist_timeout."""
    d = recipe.data
    return d.stall_timeout if d.stall_timeout is not None else 0.8 * recipe.train.dist_timeout


def check_world_size(recipe: Recipe, world_size: int) -> tuple[int, int]:
    """Per-rank batch and gradient-accumulation steps for this world size (error if it does not divide)."""
    g = recipe.train.global_batch_size
    if g % world_size:
        raise ConfigError(f"train.global_batch_size={g} is not divisible by the world size {world_size}; "
                          f"choose a global batch that is a multiple of {world_size}")
    fsdp = recipe.parallelism.fsdp
    if recipe.parallelism.strategy == "fsdp" and fsdp.sharding == "hybrid" and fsdp.replicas \
            and world_size % fsdp.replicas:
        raise ConfigError(f"parallelism.fsdp.replicas={fsdp.replicas} does not divide the world size {world_size}")
    per_rank = g // world_size
    micro = recipe.train.device_microbatch_size or per_rank
    if per_rank % micro:
        raise ConfigError(f"per-rank batch {per_rank} (global {g} / {world_size} ranks) is not divisible by "
                          f"train.device_microbatch_size={micro}")
    return per_rank, per_rank // micro
