"""What a recipe may say: typed sections with a docstring per field. Loading, overrides and validation are
in recipe/load.py. Field names equal the constructor arguments they feed."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from omegaconf import MISSING

from dip_scale.diffusion.sampler import SamplerConfig
from dip_scale.models.dip import DiPConfig

# ----------------------------------------------------------------------------------------------------
# The network
# ----------------------------------------------------------------------------------------------------


@dataclass
class ModelConfig(DiPConfig):
    """The network: a preset (dip_scale.models.PRESETS) and, on top, any DiPConfig field the recipe sets.

    Every field of DiPConfig can be set here under its own name (depth, hidden_size, num_heads, patch_size,
    num_classes, detailer_head, detailer_width, mlp_ratio, rope_theta, ...); a field the recipe leaves out
    takes the preset's value. `--dry-run` prints the resolved values."""

    preset: str = "DiP-XL/16"
    """Name in dip_scale.models.PRESETS (DiP-{XL,L,B,S}/{16,32}, DiT-..., DiP-tiny/16); its values are the
    defaults of every other model field."""


# ----------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------


@dataclass
class StreamConfig:
    """One of several datasets mixed by Streaming (data.streams)."""

    remote: Optional[str] = None
    """MDS shards written by dip-prep: s3://bucket/prefix or a local folder."""
    local: Optional[str] = None
    """Local cache folder of this stream; None = a per-job folder under $DIP_CACHE_DIR (docs/data.md)."""
    proportion: Optional[float] = None
    """Share of each epoch drawn from this stream (Streaming's `proportion`); None = by size."""


@dataclass
class DataConfig:
    """The training data: dip-prep's MDS shards, streamed (dip_scale.data.streaming)."""

    remote: Optional[str] = None
    """MDS shards: s3://bucket/prefix or a local folder. Either this or `streams`."""
    streams: Optional[list[StreamConfig]] = None
    """Several datasets mixed with proportions (each: remote, local, proportion)."""
    local: Optional[str] = None
    """Local cache folder; None = a per-job folder under $DIP_CACHE_DIR (see dip_scale.data.job_cache)."""
    image_size: list[int] = field(default_factory=lambda: [256, 256])
    """(height, width) of the stored images; must match the shards' resolution."""
    num_workers: int = 8
    """DataLoader worker processes per rank (decoding); 0 = decode in the training process."""
    num_canonical_nodes: Optional[int] = None
    """Streaming's canonical node count: fixed for the life of a run so that the sample order is the same on
    any number of nodes (set it to the first run's node count)."""
    shuffle: bool = True
    """Shuffle the samples (order = a pure function of shuffle_seed, epoch and num_canonical_nodes)."""
    shuffle_seed: int = "${seed}"  # type: ignore[assignment]  # interpolated by OmegaConf
    """Seed of the shuffle; defaults to the run's seed."""
    download_retry: int = 6
    """Retries of a failed shard download, with backoff 1, 2, 4, ... 30 s (about a minute in all by default),
    each logged with the shard and the store; a store down for longer stops the run for a requeue (exit 75)."""
    download_timeout: float = 60.0
    """Seconds one shard download may take before it counts as failed (a stalled store)."""
    stall_timeout: Optional[float] = None
    """Seconds a rank waits for its next batch, whatever the cause, before the run checkpoints and stops for a
    requeue (exit 75); None = 80% of train.dist_timeout (240 s by default). Below train.dist_timeout: the other
    ranks wait for this one meanwhile."""


# ----------------------------------------------------------------------------------------------------
# Objective and optimizer
# ----------------------------------------------------------------------------------------------------


@dataclass
class OptimConfig:
    """AdamW (torch.optim.AdamW, or DeepSpeed's with the same settings); a constant learning rate after an
    optional linear warm-up."""

    lr: float = 1e-4
    """Learning rate (constant after the warm-up; the paper uses 1e-4 without warm-up)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """Adam's (beta1, beta2)."""
    eps: float = 1e-8
    """Adam's epsilon."""
    weight_decay: float = 0.0
    """Decoupled weight decay (0 in the paper)."""
    grad_clip: float = 0.0
    """Scale the gradients down to this global L2 norm when their norm is larger; 0 = never (the paper states no
    clipping). The demo uses 1.0: at its learning rate it keeps the first steps' large gradients in bounds."""
    warmup_steps: int = 0
    """Raise the learning rate linearly from 0 to `lr` over this many steps, then keep it; 0 = none (the paper's
    setting). Composer's ConstantWithWarmupScheduler, a function of the step, so a resumed run continues the
    ramp where it stopped. Not with parallelism.strategy=deepspeed (refused when the recipe is loaded)."""


@dataclass
class RepaConfig:
    """REPA: align a hidden state of the trunk with frozen DINOv2 features (docs/dip.md)."""

    enabled: bool = False
    """Add the REPA loss (on in the paper recipes)."""
    weight: float = 0.5
    """Weight of the alignment loss added to the flow loss."""
    block: int = 8
    """Align the hidden state after this many transformer blocks (1..depth)."""
    encoder_path: Optional[str] = None
    """DINOv2 ViT-B/14 weights (dinov2_vitb14_pretrain.pth); None = $TORCH_HOME/hub/checkpoints/. Never
    downloaded: a missing file stops the start with the path it expected."""


@dataclass
class ObjectiveConfig:
    """The training objective: rectified flow with label dropout for guidance, optionally REPA."""

    label_dropout: float = 0.1
    """Probability of replacing a label by the null class (trains the unconditional model for CFG)."""
    repa: RepaConfig = field(default_factory=RepaConfig)
    """Representation alignment (REPA)."""


# ----------------------------------------------------------------------------------------------------
# Training loop
# ----------------------------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    """Batch, length, precision and device of the training loop (Composer's Trainer)."""

    global_batch_size: int = 256
    """Images per optimizer step over all ranks; per-rank batch = global / world size."""
    device_microbatch_size: Optional[int] = None
    """Images per forward/backward on one rank; gradient accumulation makes up the rest. None = none."""
    max_steps: int = 800_800
    """Optimizer steps (5,005 steps = one ImageNet epoch at batch 256)."""
    precision: str = "auto"
    """auto (bf16 autocast on GPU, fp32 on CPU), bf16 or fp32."""
    compile: bool = False
    """torch.compile each transformer block and the head (regional compilation)."""
    compile_backend: str = "inductor"
    """torch.compile backend: inductor (GPU speed), aot_eager (cheap: for CPU tests of the compiled path)."""
    activation_checkpointing: bool = False
    """Recompute each transformer block's activations in backward (less memory, ~30% more compute)."""
    nonfinite: str = "stop"
    """What a non-finite loss or gradient does: stop (checkpoint the last good state, exit 3) or skip the step."""
    device: str = "auto"
    """auto, cpu or gpu."""
    dist_timeout: float = 300.0
    """Seconds a collective (gradient reduction, barrier, checkpoint agreement) may wait for the other ranks
    before this rank gives up and exits with status 76: a hung or partitioned node then ends the job within
    this time instead of holding every GPU. Larger than the longest stretch one rank works alone (rank 0
    writing a monolithic checkpoint, one node downloading a checkpoint at resume) and than data.stall_timeout."""


@dataclass
class FSDPConfig:
    """Composer's FSDP2 (parallelism.strategy=fsdp)."""

    sharding: str = "full"
    """full (ZeRO-3), grad_op (ZeRO-2: gradients and optimizer state sharded) or hybrid (ZeRO-3 within each
    replica, replicas kept equal by an all-reduce of the gradient shards: see `replicas`)."""
    replicas: Optional[int] = None
    """hybrid: the number of replicas, the outer dimension of the (replicas, ranks per replica) device mesh;
    None = the number of nodes (each node holds one copy, sharded over its ranks). Must divide the world size."""


@dataclass
class DeepSpeedConfig:
    """DeepSpeed ZeRO under the Composer Trainer (parallelism.strategy=deepspeed; train/deepspeed.py)."""

    stage: int = 2
    """ZeRO stage: 1 (optimizer state sharded), 2 (+ gradients) or 3 (+ parameters)."""
    offload_optimizer: bool = False
    """Keep the optimizer state (and its update) in CPU memory; stage 2 or 3."""
    param_persistence_threshold: int = 100_000
    """Stage 3: parameters with at most this many elements stay whole on every rank (DeepSpeed's
    stage3_param_persistence_threshold); saves gathering many tiny tensors."""


@dataclass
class ParallelConfig:
    """How the model is spread over ranks: one strategy, with its own section of options."""

    strategy: str = "ddp"
    """ddp (data parallel), fsdp (FSDP2) or deepspeed (ZeRO)."""
    reduce_dtype: str = "fp32"
    """dtype of the gradient reduction between ranks: fp32, or bf16 (half the bytes on the network; ddp: a comm
    hook, fsdp: FSDP2's reduce dtype, deepspeed: its communication_data_type). Gradients are summed in bf16
    (8 bits of mantissa), then applied in fp32."""
    fsdp: FSDPConfig = field(default_factory=FSDPConfig)
    """Options of strategy fsdp."""
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    """Options of strategy deepspeed."""


# ----------------------------------------------------------------------------------------------------
# Checkpoints, logging, evaluation
# ----------------------------------------------------------------------------------------------------


@dataclass
class CheckpointConfig:
    """Where and how often the run is checkpointed (dip_scale.checkpoint; docs/architecture.md)."""

    save_folder: Optional[str] = None
    """Local folder or s3://bucket/prefix; the run lives in <save_folder>/<run_name>. None = runs/."""
    local_folder: Optional[str] = None
    """Where checkpoints are written before upload when save_folder is remote. None = runs/."""
    every: int = 5000
    """Save every this many steps."""
    keep_last: int = 3
    """Keep the newest K periodic checkpoints (locally and remotely)."""
    milestones: list[int] = field(default_factory=list)
    """Steps whose checkpoints are never deleted."""
    resume: bool = True
    """Continue from the newest complete checkpoint of the run if there is one."""


@dataclass
class WandbConfig:
    """Weights & Biases logging (one wandb run per training run, across resumes)."""

    enabled: bool = True
    """Log to wandb at all."""
    project: str = "dip_scale"
    """wandb project."""
    entity: Optional[str] = None
    """wandb entity (team or user); None = the default of the logged-in account."""
    mode: str = "offline"
    """offline (default: files under <run>/wandb, nothing leaves the machine; `wandb sync` uploads them),
    online or disabled."""


@dataclass
class LoggingConfig:
    """What the run reports: metric lines, sample grids, wandb."""

    log_every: int = 50
    """Log metrics (console line, metrics.jsonl, wandb) every this many steps."""
    sample_every: int = 5000
    """Write a grid of EMA samples every this many steps (0 = never)."""
    sample_classes: Optional[list[int]] = None
    """Classes of the sample grid; None = 8 classes spread evenly over the label range."""
    sample_steps: int = 50
    """Sampler steps of the grid (the grid uses the recipe's sampler otherwise)."""
    wandb: WandbConfig = field(default_factory=WandbConfig)
    """wandb settings."""
    progress_bar: bool = True
    """A progress bar when stdout is a terminal (never in a log file, whatever this says)."""
    sample_ids: bool = False
    """Append the sample ids of every step to <run>/samples_seen.jsonl (each rank; for data-order checks)."""


@dataclass
class EvalConfig:
    """Scheduled FID evaluation of the run's checkpoints (train/callbacks/fid_eval.py)."""

    every: int = 0
    """Evaluate the newest checkpoint every this many steps (0 = never)."""
    mode: str = "local"
    """local (in-process: training waits), process (dip-eval as a process of its own beside training, on this
    machine) or slurm (submit cluster/eval_fid.sh for each evaluation)."""
    num_samples: int = 1000
    """N: samples per evaluation, a multiple of the number of classes (class-balanced)."""
    batch_size: int = 64
    """Samples per forward on each rank."""
    reference: Optional[str] = None
    """ADM reference .npz, or MDS shards (local or s3://) or an image folder to compute statistics from."""
    inception_path: Optional[str] = None
    """torch-fidelity's Inception weights file; None = $DIP_INCEPTION_WEIGHTS, then the torch hub cache."""
    classifier: Optional[str] = None
    """A classifier of the synthetic classes (dip_scale.eval.classifier): each evaluation then also reports the
    class accuracy of its samples. None = no class accuracy."""
    script: str = "cluster/eval_fid.sh"
    """mode slurm: the job script to submit (relative to the working directory)."""


# ----------------------------------------------------------------------------------------------------
# The recipe
# ----------------------------------------------------------------------------------------------------


@dataclass
class Recipe:
    """A whole training run. `python -m dip_scale.train RECIPE.yaml key=value ... --dry-run` prints it resolved."""

    run_name: str = MISSING
    """Name of the run: its folder is <checkpoint.save_folder>/<run_name>; rerunning it resumes."""
    seed: int = 0
    """Initial weights, data order and every per-sample draw derive from it."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The network."""
    data: DataConfig = field(default_factory=DataConfig)
    """The training data."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """The optimizer."""
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    """The training objective."""
    ema_decay: float = 0.9999
    """Decay of the float32 EMA of the weights, updated after every optimizer step."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """The training loop."""
    parallelism: ParallelConfig = field(default_factory=ParallelConfig)
    """How the model is spread over ranks."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpointing and resume."""
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    """How samples are drawn (grids, evaluation, and the default of dip-sample / dip-eval for this run)."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Reporting."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Scheduled evaluation."""
