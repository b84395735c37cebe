"""Training-step benchmark: the same DiP trained (a) through our Composer path and (b) in a bare PyTorch
loop, in one run, timed in alternating rounds; prints images/s of both, the overhead ratio and, on a GPU,
the model FLOPs utilisation.

    python bench/train_bench.py                                            # CPU: DiP-tiny/16, 64 px, batch 16
    python bench/train_bench.py --preset DiP-XL/16 --image-size 256 --batch 64          # GPU, eager
    python bench/train_bench.py --preset DiP-XL/16 --image-size 256 --batch 64 --compile
    python bench/train_bench.py --json out.json                            # also write the numbers as JSON

(a) is what `python -m dip_scale.train` runs: a recipe validated by dip_scale.recipe, then
dip_scale.train.build.build_trainer (DiPComposerModel with its EMA copy, GuardedAdamW, the per-step
callbacks, precision, torch.compile and activation checkpointing through train/parallel.py) and
Trainer.fit. Two substitutions keep storage out of the timing: batches come from memory (uint8 images,
labels, sample ids, as the streaming loader delivers them), and the checkpoint saver is detached (it would
write a checkpoint at the end of every timed round; between its save steps its per-step work is a modulo).
(b) does the same work with nothing around it: uint8 -> [-1, 1], the flow-matching loss with the same
per-sample seeds, backward, torch.optim.AdamW, ema_update; same model, precision, compilation and
checkpointing.

Timing: after one untimed round each, rounds alternate (a, b, a, b, ...); a round runs `--warmup` untimed
steps and then `--steps` timed steps, the device synchronised only at the two ends. Medians over rounds.
overhead ratio = bare images/s / Composer images/s (1.00 = no overhead), also as the median of the ratios
of the alternating round pairs (steadier on a shared machine). MFU counts 3 x the forward FLOPs
of one image (dip_scale.train.callbacks.metrics.forward_flops: forward + backward, EMA and optimizer not
counted) against the card's dense bf16 peak.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import statistics
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

import torch

from dip_scale.diffusion.ema import ema_update, local_tensors, make_ema
from dip_scale.diffusion.flow import FlowMatching, sample_seeds, velocity_loss
from dip_scale.models import PRESETS, build_model, channels_last_weights
from dip_scale.models.dit import DiTBlock

# ----------------------------------------------------------------------------------------------------
# Settings shared by both paths
# ----------------------------------------------------------------------------------------------------


@dataclass
class StepSettings:
    preset: str = "DiP-tiny/16"
    image_size: int = 64
    batch: int = 16
    compile: bool = False
    compile_scope: str = "regional"
    """regional: each block and the head, as train.compile does; full: the whole network (bare loop only)."""
    activation_checkpointing: bool = False
    seed: int = 0
    lr: float = 1e-4
    ema_decay: float = 0.9999
    overrides: dict = field(default_factory=dict)
    """DiPConfig fields replacing the preset's (e.g. detailer_head)."""
    device_kind: str = "auto"
    """auto (the GPU when there is one), cpu or cuda."""

    @property
    def device(self) -> torch.device:
        if self.device_kind == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device_kind)

    @property
    def net_config(self):
        import dataclasses

        return dataclasses.replace(PRESETS[self.preset], **self.overrides)

    @property
    def amp(self) -> bool:
        """bf16 autocast on a GPU (Composer's amp_bf16), fp32 on a CPU, as the recipes resolve `auto`."""
        return self.device.type == "cuda"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class MemoryBatches:
    """`num_batches` fixed batches, yielded in order each epoch, in the loader's format:
    [uint8 images (B, 3, H, W), int64 labels (B,), int64 sample ids (B,)], on the CPU."""

    def __init__(self, settings: StepSettings, num_batches: int = 4):
        g = torch.Generator().manual_seed(settings.seed)
        n, s, k = settings.batch, settings.image_size, settings.net_config.num_classes
        self.batches = [[torch.randint(0, 256, (n, 3, s, s), generator=g, dtype=torch.uint8),
                         torch.randint(0, k, (n,), generator=g),
                         torch.arange(i * n, (i + 1) * n)] for i in range(num_batches)]

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        return iter(self.batches)


# ----------------------------------------------------------------------------------------------------
# (a) the Composer path
# ----------------------------------------------------------------------------------------------------


def bench_recipe_yaml(s: StepSettings, workdir: Path) -> str:
    """A recipe for the paper's training step (no REPA: its encoder weights are not part of a benchmark)."""
    model = "\n".join(f"  {k}: {v}" for k, v in s.overrides.items())
    return f"""\
run_name: train-bench
seed: {s.seed}
model:
  preset: {s.preset}
{model}
data:
  remote: in-memory
  image_size: [{s.image_size}, {s.image_size}]
  num_workers: 0
optim:
  lr: {s.lr}
ema_decay: {s.ema_decay}
train:
  global_batch_size: {s.batch}
  max_steps: 1000000
  precision: auto
  device: {"gpu" if s.device.type == "cuda" else "cpu"}
  compile: {str(s.compile).lower()}
  activation_checkpointing: {str(s.activation_checkpointing).lower()}
checkpoint:
  save_folder: {workdir}
  every: 1000000
  resume: false
logging:
  log_every: 50
  sample_every: 0
  wandb:
    enabled: false
  progress_bar: false
"""


def make_clock(device: torch.device):
    """A Composer callback that takes device-synchronised time stamps at the end of chosen steps."""
    from composer.core import Callback

    class Clock(Callback):
        def __init__(self):
            self.marks: set[int] = set()
            self.times: list[float] = []

        def batch_end(self, state, logger):
            if int(state.timestamp.batch) in self.marks:
                synchronize(device)
                self.times.append(time.perf_counter())

    return Clock()


class ComposerPath:
    """Our training entry point's objects, built by dip_scale.train.build.build_trainer."""

    name = "composer"

    def __init__(self, s: StepSettings, workdir: Path):
        from dip_scale.recipe import load_recipe
        from dip_scale.train import build
        from dip_scale.train.callbacks.checkpoint import CheckpointSaver

        self.settings = s
        recipe_file = workdir / "train_bench.yaml"
        recipe_file.write_text(bench_recipe_yaml(s, workdir))
        recipe = load_recipe(recipe_file)
        self.loader = MemoryBatches(s)
        with mock.patch.object(build, "build_dataloader", lambda recipe, per_rank: self.loader):
            self.trainer, _ = build.build_trainer(recipe)
        callbacks = self.trainer.state.callbacks
        callbacks[:] = [c for c in callbacks if not isinstance(c, CheckpointSaver)]
        self.clock = make_clock(s.device)
        callbacks.append(self.clock)
        self.model = self.trainer.state.model

    def run(self, warmup: int, steps: int) -> float:
        """Seconds for `steps` steps after `warmup` (>= 1) untimed ones."""
        if warmup < 1:
            raise ValueError("the Composer path needs warmup >= 1: the clock starts at the end of a step")
        start = int(self.trainer.state.timestamp.batch)
        self.clock.marks = {start + warmup, start + warmup + steps}
        self.clock.times = []
        self.trainer.fit(duration=f"{warmup + steps}ba")
        t0, t1 = self.clock.times
        return t1 - t0

    def close(self):
        self.trainer.close()


# ----------------------------------------------------------------------------------------------------
# (b) the bare loop
# ----------------------------------------------------------------------------------------------------


def prepare_like_training(net: torch.nn.Module, s: StepSettings) -> None:
    """Activation checkpointing and regional compilation exactly as train/parallel.py applies them (or, with
    compile_scope="full", one graph for the whole network)."""
    from dip_scale.train import parallel

    if s.activation_checkpointing:
        parallel.apply_activation_checkpointing(net, check_fn=lambda m: isinstance(m, DiTBlock))
    if s.compile and s.compile_scope == "full":
        net.compile()
    elif s.compile:
        for unit in parallel.shard_units(net):
            unit.compile()


class BareLoop:
    """forward, loss, backward, AdamW, EMA update: nothing else. The AdamW kernel is the one training uses
    (fused on a GPU, dip_scale.train.optim.use_fused_adamw); `fused_adamw` overrides it to compare the two
    (docs/perf_log.md)."""

    name = "bare"

    def __init__(self, s: StepSettings, fused_adamw: bool | None = None):
        self.settings = s
        self.device = s.device
        torch.manual_seed(s.seed)
        with self.device:  # initialised where it trains: no host-side init of a 600M-parameter model
            self.net = channels_last_weights(build_model(s.net_config))  # as parallel.prepare does under ddp
        self.ema = make_ema(self.net)
        prepare_like_training(self.net, s)
        self.flow = FlowMatching(num_classes=s.net_config.num_classes)
        if fused_adamw is None:
            from dip_scale.train.optim import use_fused_adamw

            fused_adamw = use_fused_adamw("gpu" if self.device.type == "cuda" else "cpu", "ddp")
        self.fused_adamw = fused_adamw
        opt_args = dict(lr=s.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
        if fused_adamw:
            opt_args["fused"] = True
        self.optimizer = torch.optim.AdamW(self.net.parameters(), **opt_args)
        self.ema_tensors, self.live_tensors = local_tensors(self.ema), local_tensors(self.net)
        self.batches = MemoryBatches(s).batches
        self.step_count = 0

    def step(self, batch) -> torch.Tensor:
        images, labels, ids = batch
        seeds = sample_seeds(self.settings.seed, 0, ids)  # ids stay on the CPU: no device sync
        x = images.to(self.device, non_blocking=True).float().div_(127.5).sub_(1.0)
        y = labels.to(self.device, non_blocking=True)
        amp = (torch.autocast("cuda", dtype=torch.bfloat16) if self.settings.amp else contextlib.nullcontext())
        with amp:
            inputs = self.flow.training_inputs(x, y, seeds)
            loss = velocity_loss(self.net(inputs.x_t, inputs.t, inputs.y), inputs.v)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        ema_update(self.ema_tensors, self.live_tensors, self.settings.ema_decay)
        self.step_count += 1
        return loss

    def run(self, warmup: int, steps: int) -> float:
        """Seconds for `steps` steps after `warmup` untimed ones."""
        batches = self.batches
        for _ in range(warmup):
            self.step(batches[self.step_count % len(batches)])
        synchronize(self.device)
        t0 = time.perf_counter()
        for _ in range(steps):
            self.step(batches[self.step_count % len(batches)])
        synchronize(self.device)
        return time.perf_counter() - t0

    def close(self):
        pass


# ----------------------------------------------------------------------------------------------------
# Measuring
# ----------------------------------------------------------------------------------------------------


def train_flops_per_image(s: StepSettings) -> int:
    from dip_scale.train.callbacks.metrics import forward_flops

    return 3 * forward_flops(s.net_config, (s.image_size, s.image_size))


def peak_flops() -> float | None:
    from dip_scale.train.callbacks.metrics import device_peak_flops

    return device_peak_flops()


def device_name(kind: str = "auto") -> str:
    if kind != "cpu" and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def alternate(paths: list, warmup: int, steps: int, rounds: int, batch: int) -> dict[str, list[float]]:
    """One untimed round each (compilation, allocator, caches), then `rounds` alternating timed rounds;
    images/s of every round, per path."""
    for p in paths:
        p.run(warmup, 1)
    rates: dict[str, list[float]] = {p.name: [] for p in paths}
    for _ in range(rounds):
        for p in paths:
            rates[p.name].append(batch * steps / p.run(warmup, steps))
    return rates


def summarise(rates: dict[str, list[float]], flops: int, peak: float | None) -> dict:
    out = {}
    for name, r in rates.items():
        med = statistics.median(r)
        out[name] = {"img_s": med, "img_s_min": min(r), "img_s_max": max(r), "rounds": r,
                     "mfu": flops * med / peak if peak else None}
    if "composer" in out and "bare" in out:
        out["overhead_ratio"] = out["bare"]["img_s"] / out["composer"]["img_s"]
        # Rounds alternate, so each pair ran under nearly the same machine load: the median of the pairs'
        # ratios is steadier than the ratio of medians where other jobs share the machine.
        out["paired_overhead_ratio"] = statistics.median(b / c for c, b in zip(rates["composer"], rates["bare"]))
    return out


def format_table(result: dict) -> str:
    s = result["settings"]
    lines = [f"train step: {s['preset']} at {s['image_size']} px, batch {s['batch']}, "
             f"{'compiled' if s['compile'] else 'eager'}{', act. ckpt' if s['activation_checkpointing'] else ''}, "
             f"{result['precision']} on {result['device']}",
             f"{'path':<10} {'img/s':>10} {'min':>10} {'max':>10} {'MFU':>7}"]
    for name in ("composer", "bare"):
        r = result["paths"].get(name)
        if r:
            mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
            lines.append(f"{name:<10} {r['img_s']:>10.2f} {r['img_s_min']:>10.2f} {r['img_s_max']:>10.2f} {mfu:>7}")
    if "overhead_ratio" in result["paths"]:
        lines.append(f"overhead ratio (bare / composer img/s): {result['paths']['overhead_ratio']:.3f}; "
                     f"median of the rounds' ratios: {result['paths']['paired_overhead_ratio']:.3f}")
    lines.append(f"train FLOPs per image (3 x forward): {result['train_flops_per_image'] / 1e9:.3f} GFLOP")
    return "\n".join(lines)


def quiet():
    """Composer and torch warn about CPU training, missing loggers etc.; a benchmark prints only numbers."""
    warnings.filterwarnings("ignore")
    logging.getLogger("composer").setLevel(logging.ERROR)
    logging.getLogger("dip_scale").setLevel(logging.WARNING)
    logging.getLogger("torch._dynamo").setLevel(logging.ERROR)  # graph-break notes on a CPU


def run(s: StepSettings, warmup: int, steps: int, rounds: int, only: str | None = None) -> dict:
    quiet()
    with tempfile.TemporaryDirectory(prefix="train-bench-") as tmp:
        paths = []
        if only in (None, "composer"):
            paths.append(ComposerPath(s, Path(tmp)))
        if only in (None, "bare"):
            paths.append(BareLoop(s))
        try:
            rates = alternate(paths, warmup, steps, rounds, s.batch)
        finally:
            for p in paths:
                p.close()
    flops = train_flops_per_image(s)
    return {"settings": {**s.__dict__, "warmup": warmup, "steps": steps, "rounds": rounds},
            "device": device_name(s.device.type), "precision": "bf16 autocast" if s.amp else "fp32",
            "train_flops_per_image": flops, "paths": summarise(rates, flops, peak_flops())}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[2:7]))
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: the GPU when there is one (then the GPU defaults below apply)")
    p.add_argument("--preset", default=None, help="model preset (default DiP-tiny/16 on CPU, DiP-XL/16 on GPU)")
    p.add_argument("--image-size", type=int, default=None, help="pixels (default 64 on CPU, 256 on GPU)")
    p.add_argument("--batch", type=int, default=None, help="images per step (default 16 on CPU, 64 on GPU)")
    p.add_argument("--detailer-head", default=None, help="override the preset's head (unet, mlp, attention, none)")
    p.add_argument("--compile", action="store_true", help="torch.compile the blocks and the head, as train.compile")
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps at the start of every round")
    p.add_argument("--steps", type=int, default=None, help="timed steps per round (default 20 CPU, 10 GPU)")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds per path (default 5 CPU, 3 GPU)")
    p.add_argument("--only", choices=("composer", "bare"), default=None, help="time one path only")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default torch's; 1 is far steadier on a CPU shared with other jobs)")
    p.add_argument("--json", default=None, help="write the result as JSON to this file")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    gpu = a.device == "cuda" or (a.device == "auto" and torch.cuda.is_available())
    s = StepSettings(device_kind="cuda" if gpu else "cpu",
                     preset=a.preset or ("DiP-XL/16" if gpu else "DiP-tiny/16"),
                     image_size=a.image_size or (256 if gpu else 64), batch=a.batch or (64 if gpu else 16),
                     compile=a.compile, activation_checkpointing=a.activation_checkpointing,
                     overrides={"detailer_head": a.detailer_head} if a.detailer_head else {})
    result = run(s, a.warmup, a.steps or (10 if gpu else 20), a.rounds or (3 if gpu else 5), a.only)
    print(format_table(result))
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2, default=str))
    return result


if __name__ == "__main__":
    main()
