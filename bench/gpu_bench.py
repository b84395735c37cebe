"""DiP speed on one GPU, in one run: the training step through our Composer path and through a bare loop,
eager and compiled; the sampler (Euler with CFG) at batch 1 and at a large batch, eager and compiled with
CUDA graphs; peak memory of a training step for several per-GPU batches with and without activation
checkpointing. Prints a table (img/s, MFU from counted FLOPs, latency, peak memory, relative difference to
the reference computation, card name) and writes every detail to $OUT/gpu_bench.json.

    python bench/gpu_bench.py                              # GPU: DiP-XL/16 at 256 px, within --budget-s
    python bench/gpu_bench.py --skip train-compiled,memory # leave sections out (or --only a,b)
    python bench/gpu_bench.py --cpu                        # CPU mode: DiP-tiny/16 at 32 px, every section
    bash bench/gpu_check.sh                                # what a GPU session runs (installs, then this)

Sections, in the order they run (a section that would overrun --budget-s is skipped and listed):
  memory            bare eager step at each --memory-batches, without and with activation checkpointing
  train-eager       Composer path and bare loop, alternating rounds (bench/train_bench.py); overhead ratio
  train-compiled    the same with train.compile (regional torch.compile of the blocks and the head)
  sample-eager      batch 1 and --sample-batch: bf16 autocast (what dip-sample does) and bf16 weights
  sample-compiled   batch 1: what dip-sample/dip-eval --compile run (bf16 weights, torch.compile, CUDA graphs)
  variants          bare eager step with alternatives to what training does (the other AdamW kernel; on a
                    GPU each attention backend forced), see docs/perf_log.md
  sample-compiled-large   the same at --sample-batch
  train-compiled-full     (only with --only) bare loop with the whole network as one compiled graph

Golden equivalence: every optimised variant is compared with the plain eager computation on the same input
(`rel diff` = ||out - ref|| / ||ref||, float32). Its scale is the difference that bf16 itself makes:
the `rounding` row gives ||bf16 autocast - fp32|| / ||fp32|| for the same forward, and the batch-1 sampling
rows give each sample's difference to the float32 sample.
Sampling throughput at the large batch is measured over --sample-steps-large steps and reported for a
--sample-steps run by counting network evaluations (guided steps run the batch twice).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_bench as tb  # noqa: E402  (sibling script)

from dip_scale.diffusion.sampler import SamplerConfig, prepare_for_sampling, sample, sample_noise  # noqa: E402
from dip_scale.models.dip import build_model  # noqa: E402

SECTIONS = ("memory", "train-eager", "train-compiled", "sample-eager", "sample-compiled", "variants",
            "sample-compiled-large", "train-compiled-full")
DEFAULT_SECTIONS = SECTIONS[:-1]  # train-compiled-full only when asked for (--only): another ~2 min compile
# Seconds each section took for DiP-XL/16 on an H200 with torch 2.11 (compilation included: ~15-25 s for the
# regional training graphs, ~45 s for CUDA-graph sampling); used to skip what would overrun the budget.
XL_COST_S = {"memory": 15, "train-eager": 45, "train-compiled": 50, "sample-eager": 35, "sample-compiled": 55,
             "variants": 45, "sample-compiled-large": 65, "train-compiled-full": 100}
GIB = 2**30


# ----------------------------------------------------------------------------------------------------
# Plan
# ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Plan:
    device: str
    preset: str
    image_size: int
    batch: int
    warmup: int
    steps: int
    rounds: int
    sample_steps: int
    sample_batch: int
    sample_steps_large: int
    guidance_scale: float
    guidance_interval: tuple[float, float]
    memory_batches: tuple[int, ...]
    sections: tuple[str, ...]
    budget_s: float
    profile: bool
    compile_backend: str
    out: Path | None

    @property
    def gpu(self) -> bool:
        return self.device == "cuda"

    def step_settings(self, **changes) -> tb.StepSettings:
        s = tb.StepSettings(preset=self.preset, image_size=self.image_size, batch=self.batch,
                            device_kind=self.device)
        return dataclasses.replace(s, **changes)


def make_plan(a: argparse.Namespace) -> Plan:
    gpu = torch.cuda.is_available() and not a.cpu
    pick = (lambda g, c: g) if gpu else (lambda g, c: c)
    sections = tuple(a.only.split(",")) if a.only else DEFAULT_SECTIONS
    skip = set(a.skip.split(",")) if a.skip else set()
    unknown = (set(sections) | skip) - set(SECTIONS)
    if unknown:
        raise SystemExit(f"unknown section(s) {sorted(unknown)}; expected some of {list(SECTIONS)}")
    return Plan(
        device="cuda" if gpu else "cpu",
        preset=a.preset or pick("DiP-XL/16", "DiP-tiny/16"),
        image_size=a.image_size or pick(256, 32),
        batch=a.batch or pick(64, 4),
        warmup=a.warmup if a.warmup is not None else pick(2, 1),
        steps=a.steps or pick(8, 2),
        rounds=a.rounds or pick(3, 1),
        sample_steps=a.sample_steps or pick(100, 10),
        sample_batch=a.sample_batch or pick(128, 4),
        sample_steps_large=a.sample_steps_large or pick(20, 4),
        guidance_scale=a.guidance_scale,
        guidance_interval=tuple(a.guidance_interval),
        memory_batches=tuple(int(b) for b in (a.memory_batches or pick("32,64,128", "2,4,8")).split(",")),
        sections=tuple(s for s in sections if s not in skip),
        budget_s=a.budget_s if a.budget_s is not None else pick(480.0, 0.0),
        profile=a.profile if a.profile is not None else gpu,
        compile_backend=a.compile_backend,
        out=Path(a.out) if a.out else (Path(os.environ["OUT"]) if os.environ.get("OUT") else None),
    )


# ----------------------------------------------------------------------------------------------------
# The run: rows for the table, details for the JSON, budget bookkeeping
# ----------------------------------------------------------------------------------------------------


class Bench:
    def __init__(self, plan: Plan):
        self.plan = plan
        self.t0 = time.monotonic()
        self.device = torch.device(plan.device)
        self.rows: list[dict] = []
        self.details: dict = {"plan": {k: (str(v) if isinstance(v, Path) else v)
                                       for k, v in dataclasses.asdict(plan).items()}}
        self.skipped: list[str] = []
        self.errors: list[str] = []
        self.config = plan.step_settings().net_config
        from dip_scale.train.callbacks.metrics import forward_flops

        self.forward_flops = forward_flops(self.config, (plan.image_size, plan.image_size))
        self.peak = tb.peak_flops() if plan.gpu else None
        self.details["environment"] = {
            "device": tb.device_name(plan.device),
            "torch": torch.__version__, "python": sys.version.split()[0], "cuda": torch.version.cuda,
            "peak_flops": self.peak, "forward_flops_per_image": self.forward_flops}
        self.details["environment"]["packages"] = package_versions()
        if plan.out:
            plan.out.mkdir(parents=True, exist_ok=True)

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def cost(self, name: str) -> float:
        """Expected seconds of a section: the XL figures scaled by model FLOPs on a GPU, none on a CPU."""
        if not self.plan.gpu:
            return 0.0
        return XL_COST_S[name] * max(0.25, self.forward_flops / 255e9)

    def section(self, name: str, fn) -> None:
        if name not in self.plan.sections:
            return
        need, left = self.cost(name), self.plan.budget_s - self.elapsed
        if self.plan.budget_s and need > left:
            self.skipped.append(f"{name} (needs ~{need:.0f} s, {max(left, 0):.0f} s of the budget left)")
            print(f"[{self.elapsed:6.0f} s] skip {name}: needs ~{need:.0f} s, {max(left, 0):.0f} s left", flush=True)
            return
        print(f"[{self.elapsed:6.0f} s] {name}", flush=True)
        t = time.monotonic()
        try:
            fn()
        except Exception as err:  # one failing section must not cost the others
            self.errors.append(f"{name}: {type(err).__name__}: {err}")
            self.details.setdefault("tracebacks", {})[name] = traceback.format_exc()
            self.row(name, "FAILED", note=f"{type(err).__name__}: {str(err).splitlines()[0][:80] if str(err) else ''}")
            print(traceback.format_exc(), flush=True)
        finally:
            self.details.setdefault("section_seconds", {})[name] = time.monotonic() - t
            free_memory()
            self.save()

    def row(self, section: str, what: str, img_s=None, mfu=None, seconds=None, peak_gib=None, rel_diff=None,
            note: str = "") -> dict:
        r = dict(section=section, what=what, img_s=img_s, mfu=mfu, seconds=seconds, peak_gib=peak_gib,
                 rel_diff=rel_diff, note=note)
        self.rows.append(r)
        return r

    def mfu(self, img_s: float, flops_per_image: float) -> float | None:
        return flops_per_image * img_s / self.peak if self.peak else None

    def save(self) -> None:
        self.details.update(rows=self.rows, skipped=self.skipped, errors=self.errors, elapsed_s=self.elapsed)
        if self.plan.out:
            (self.plan.out / "gpu_bench.json").write_text(json.dumps(self.details, indent=2, default=str))

    def table(self) -> str:
        self.save()
        return format_table(self.details)


def format_table(details: dict) -> str:
    """The printed table, from the details (also from a saved gpu_bench.json: --table-from)."""
    env, p = details["environment"], details["plan"]
    peak = env["peak_flops"]
    lines = [f"DiP speed: {p['preset']} at {p['image_size']} px on {env['device']}, torch {env['torch']}"
             + (f", MFU against {peak / 1e12:.0f} TFLOP/s" if peak else ""),
             f"forward {env['forward_flops_per_image'] / 1e9:.2f} GFLOP/image (counted); training counts 3x, "
             "sampling 1x per network evaluation",
             f"{'section':<16} {'what':<44} {'img/s':>9} {'MFU':>6} {'seconds':>9} {'peak GiB':>9} "
             f"{'rel diff':>9}  note"]
    for r in details["rows"]:
        lines.append(f"{r['section']:<16} {r['what']:<44} {_num(r['img_s'], '.2f'):>9} "
                     f"{_num(r['mfu'], '.1%'):>6} {_num(r['seconds'], '.3f'):>9} "
                     f"{_num(r['peak_gib'], '.1f'):>9} {_num(r['rel_diff'], '.1e'):>9}  {r['note']}")
    lines += [f"skipped: {s}" for s in details["skipped"]]
    lines += [f"error: {e}" for e in details["errors"]]
    lines.append(f"total {details['elapsed_s']:.0f} s")
    return "\n".join(lines)


def package_versions() -> dict[str, str]:
    """Versions of the stack the benchmark needs; what does not import is reported, not fatal (the Composer
    rows then fail and say why, the bare loop and the sampler still run)."""
    import importlib

    out = {}
    for name in ("composer", "streaming", "omegaconf", "tqdm", "PIL", "numpy", "dip_scale.train.build"):
        try:
            out[name] = str(getattr(importlib.import_module(name), "__version__", "ok"))
        except Exception as err:
            out[name] = f"MISSING ({type(err).__name__}: {err})"
    return out


def _num(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def rel_diff(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().float(), ref.detach().float()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


# ----------------------------------------------------------------------------------------------------
# Golden equivalence of a training-side variant: its forward vs the plain eager forward, same weights
# ----------------------------------------------------------------------------------------------------


def probe_inputs(s: tb.StepSettings):
    """A fixed (x_t, t, y) at the training batch shape (a compiled net then reuses its training graph)."""
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(s.batch, 3, s.image_size, s.image_size, generator=g)
    t = torch.rand(s.batch, generator=g)
    y = torch.randint(0, s.net_config.num_classes, (s.batch,), generator=g)
    return x.to(s.device), t.to(s.device), y.to(s.device)


def autocast(s: tb.StepSettings, enabled: bool = True):
    return torch.autocast(s.device.type, dtype=torch.bfloat16, enabled=enabled and s.amp)


class CheckedBareLoop(tb.BareLoop):
    """The bare loop, plus the forward of its (transformed) network on a probe input next to the plain
    eager network's, before any step changes the weights. `context` (a factory of context managers, e.g. an
    SDPA backend choice) surrounds the variant's forward, not the reference's."""

    def __init__(self, s: tb.StepSettings, context=contextlib.nullcontext, **variants):
        probe = probe_inputs(s)
        torch.manual_seed(s.seed)
        with s.device:
            plain = build_model(s.net_config)
        with torch.no_grad():
            with autocast(s):
                self.reference = plain(*probe).float()
            self.rounding = rel_diff(self.reference, plain(*probe)) if s.amp else 0.0  # bf16 vs fp32
        del plain
        super().__init__(s, **variants)
        with context(), autocast(s):  # grad mode: the graph training uses
            out = self.net(*probe)
        self.rel_diff = rel_diff(out, self.reference)
        del out


# ----------------------------------------------------------------------------------------------------
# Sections: training
# ----------------------------------------------------------------------------------------------------


def profile_steps(bench: Bench, runner: tb.BareLoop, tag: str, steps: int = 3) -> None:
    """Kernel time by category (and the top ops) for a few bare steps, to $OUT/profile_<tag>.txt."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if bench.plan.gpu else [])
    batches = runner.batches
    tb.synchronize(runner.device)
    with profile(activities=activities) as prof:
        for _ in range(steps):
            runner.step(batches[runner.step_count % len(batches)])
        tb.synchronize(runner.device)
    averages = prof.key_averages()
    sort = "self_cuda_time_total" if bench.plan.gpu else "self_cpu_time_total"
    try:
        text = averages.table(sort_by=sort, row_limit=40)
    except (KeyError, AttributeError):
        text = averages.table(sort_by="self_device_time_total" if bench.plan.gpu else sort, row_limit=40)
    categories = kernel_categories(averages, bench.plan.gpu)
    bench.details.setdefault("profile", {})[tag] = {"steps": steps, "ms_per_step_by_category":
                                                    {k: v / 1e3 / steps for k, v in categories.items()}}
    if bench.plan.out:
        (bench.plan.out / f"profile_{tag.replace(' ', '_')}.txt").write_text(
            f"{tag}: {steps} steps\n{json.dumps(bench.details['profile'][tag], indent=2)}\n\n{text}\n")


CATEGORIES = (  # matched in order against kernel (GPU) or op (CPU) names; a rough guide, not an exact split
    ("attention", ("flash", "fmha", "attention", "sdpa", "efficient_attention")),
    ("optimizer+ema", ("multi_tensor", "foreach", "adam", "lerp", "fused_adam")),
    ("conv (head)", ("conv", "cudnn", "dgrad", "wgrad", "fprop", "winograd", "max_pool", "pool2d")),
    ("matmul", ("gemm", "cutlass", "xmma", "cublas", "nvjet", "matmul", "aten::mm", "aten::addmm", "aten::bmm",
                "sm90", "sm80")),
    ("compiled fusions", ("triton",)),
    ("copies", ("copy", "memcpy", "memset", "cat", "transpose", "contiguous")),
)


def kernel_categories(averages, gpu: bool) -> dict[str, float]:
    """Self time in microseconds per category: GPU kernels on a GPU, aten ops on a CPU."""
    out: dict[str, float] = {}
    for evt in averages:
        if gpu:
            t = getattr(evt, "self_device_time_total", None)
            if t is None:
                t = getattr(evt, "self_cuda_time_total", 0.0)
            if str(getattr(evt, "device_type", "")).endswith("CPU"):
                continue
        else:
            if not evt.key.startswith("aten::"):
                continue
            t = evt.self_cpu_time_total
        if not t:
            continue
        name = evt.key.lower()
        cat = next((c for c, keys in CATEGORIES if any(k in name for k in keys)), "other")
        out[cat] = out.get(cat, 0.0) + t
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def train_section(bench: Bench, compiled: bool) -> None:
    p = bench.plan
    s = p.step_settings(compile=compiled)
    tag = "train compiled" if compiled else "train eager"
    flops = 3 * bench.forward_flops
    paths, build_s = [], {}
    with tempfile.TemporaryDirectory(prefix="gpu-bench-") as tmp:
        try:
            t = time.monotonic()
            paths.append(tb.ComposerPath(s, Path(tmp)))
            build_s["composer"] = time.monotonic() - t
        except Exception as err:  # e.g. a package the Composer path needs is missing: the bare loop still runs
            bench.errors.append(f"{tag} composer path: {type(err).__name__}: {err}")
            bench.details.setdefault("tracebacks", {})[f"{tag} composer"] = traceback.format_exc()
        t = time.monotonic()
        bare = CheckedBareLoop(s)
        paths.append(bare)
        build_s["bare"] = time.monotonic() - t
        reset_peak(bench.device)
        t = time.monotonic()
        for path in list(paths):  # first round: compilation, allocator, autotuning
            try:
                path.run(1, 1)
            except Exception as err:
                if path is bare:
                    raise
                bench.errors.append(f"{tag} composer path: {type(err).__name__}: {err}")
                bench.details.setdefault("tracebacks", {})[f"{tag} composer"] = traceback.format_exc()
                path.close()
                paths.remove(path)
        first_round_s = time.monotonic() - t
        rates = {path.name: [] for path in paths}
        for _ in range(p.rounds):
            for path in paths:
                rates[path.name].append(s.batch * p.steps / path.run(p.warmup, p.steps))
        peak = peak_gib(bench.device)
        if p.profile:
            profile_steps(bench, bare, tag)
        for path in paths:
            path.close()
    summary = tb.summarise(rates, flops, bench.peak)
    # Both paths' weights, EMA and optimizer state are resident here; the memory section has the real peaks.
    bench.details[tag] = {"rates": rates, "build_s": build_s, "first_round_s": first_round_s,
                          "rel_diff": bare.rel_diff, "rounding": bare.rounding, "summary": summary,
                          "peak_gib_both_paths": peak}
    for name in ("composer", "bare"):
        if name in summary:
            r = summary[name]
            note = f"min {r['img_s_min']:.1f} max {r['img_s_max']:.1f}"
            if compiled:
                note += f"; compile + warm-up {build_s.get(name, 0) + first_round_s:.0f} s"
            bench.row(tag, f"{name}, batch {s.batch}", r["img_s"], r["mfu"], s.batch / r["img_s"],
                      rel_diff=bare.rel_diff if name == "bare" and compiled else None, note=note)
    if "overhead_ratio" in summary:
        bench.row(tag, "overhead ratio bare/composer", note=f"{summary['overhead_ratio']:.3f} (median of round "
                  f"pairs {summary['paired_overhead_ratio']:.3f})")
    if not compiled and s.amp:
        bench.row(tag, "rounding: bf16 autocast vs fp32 forward", rel_diff=bare.rounding)
    del bare, paths


def compiled_full_section(bench: Bench) -> None:
    """The bare loop with torch.compile of the whole network instead of block by block."""
    p = bench.plan
    s = p.step_settings(compile=True, compile_scope="full")
    t = time.monotonic()
    runner = CheckedBareLoop(s)
    runner.run(1, 1)
    compile_s = time.monotonic() - t
    rates = [s.batch * p.steps / runner.run(p.warmup, p.steps) for _ in range(p.rounds)]
    img_s = statistics.median(rates)
    bench.row("train compiled", f"bare, batch {s.batch}, whole-network graph", img_s,
              bench.mfu(img_s, 3 * bench.forward_flops), s.batch / img_s, peak_gib(bench.device), runner.rel_diff,
              f"compile + warm-up {compile_s:.0f} s")


def memory_section(bench: Bench) -> None:
    """Peak of an eager training step: weights, EMA, gradients, AdamW state and activations. Activation
    checkpointing as train.activation_checkpointing applies it (the DiT blocks)."""
    p = bench.plan
    flops = 3 * bench.forward_flops
    # Anything earlier sections left allocated would count in every peak below: say how much there is.
    resident = torch.cuda.memory_allocated(bench.device) / GIB if p.gpu else 0.0
    bench.details["memory_resident_before_gib"] = resident
    note = f"{resident:.1f} GiB was resident before" if resident > 0.25 else ""
    for checkpointing in (False, True):
        s = p.step_settings(activation_checkpointing=checkpointing)
        runner = tb.BareLoop(s)
        for b in p.memory_batches:
            batch = tb.MemoryBatches(dataclasses.replace(s, batch=b), num_batches=1).batches[0]
            label = f"batch {b}, {'with' if checkpointing else 'no'} act. ckpt"
            reset_peak(bench.device)
            try:
                runner.step(batch)
                tb.synchronize(runner.device)
                t = time.perf_counter()
                for _ in range(2):
                    runner.step(batch)
                tb.synchronize(runner.device)
                img_s = 2 * b / (time.perf_counter() - t)
                bench.row("memory", label, img_s, bench.mfu(img_s, flops), b / img_s, peak_gib(bench.device),
                          note=note)
            except torch.cuda.OutOfMemoryError:
                bench.row("memory", label, peak_gib=peak_gib(bench.device), note="out of memory")
                runner.optimizer.zero_grad(set_to_none=True)
                free_memory()
                break  # larger batches will not fit either
        del runner
        free_memory()


def variants_section(bench: Bench) -> None:
    """Alternatives to what training does, eager, vs the plain loop (docs/perf_log.md): the other AdamW
    kernel (foreach on a GPU, where training uses the fused one; fused on a CPU), and on a GPU each SDPA
    backend forced in turn (torch picks one by itself in the plain loop)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    p = bench.plan
    flops = 3 * bench.forward_flops
    s = p.step_settings()
    other_adamw = "foreach AdamW" if p.gpu else "fused AdamW"
    variants = [("plain", {}, contextlib.nullcontext), (other_adamw, {"fused_adamw": not p.gpu},
                                                        contextlib.nullcontext)]
    if p.gpu:  # CUDA kernels
        variants += [("cuDNN attention", {}, lambda: sdpa_kernel(SDPBackend.CUDNN_ATTENTION)),
                     ("flash attention", {}, lambda: sdpa_kernel(SDPBackend.FLASH_ATTENTION))]
    for name, kwargs, context in variants:
        try:
            runner = CheckedBareLoop(s, context=context, **kwargs)
            diff = runner.rel_diff
            with context():  # the fp32 reference forward ran outside it: an attention backend may want bf16
                runner.run(1, 1)
                rates = [s.batch * p.steps / runner.run(p.warmup, p.steps) for _ in range(max(1, p.rounds - 1))]
            del runner
        except Exception as err:  # a backend this card or torch lacks: note it, go on with the others
            bench.row("variants", f"bare eager, {name}", note=f"{type(err).__name__}: {str(err)[:60]}")
            bench.errors.append(f"variants {name}: {type(err).__name__}: {err}")
            continue
        finally:
            free_memory()
        img_s = statistics.median(rates)
        bench.row("variants", f"bare eager, {name}", img_s, bench.mfu(img_s, flops), s.batch / img_s,
                  rel_diff=None if name == "plain" else diff, note=f"rounds {', '.join(f'{r:.1f}' for r in rates)}")


# ----------------------------------------------------------------------------------------------------
# Sections: sampling
# ----------------------------------------------------------------------------------------------------


class Sampling:
    """One network and the inputs of the sampling measurements."""

    def __init__(self, bench: Bench):
        p = bench.plan
        self.bench = bench
        self.null = self.bench.config.num_classes
        torch.manual_seed(0)
        with bench.device:
            self.net = build_model(bench.config).eval().requires_grad_(False)
        self.cfg = SamplerConfig(steps=p.sample_steps, guidance_scale=p.guidance_scale,
                                 guidance_interval=p.guidance_interval)
        self.cfg_large = dataclasses.replace(self.cfg, steps=p.sample_steps_large)
        self.amp = torch.bfloat16 if p.gpu else None

    def inputs(self, batch: int):
        p = self.bench.plan
        noise = sample_noise(range(batch), (3, p.image_size, p.image_size), seed=0, device=self.bench.device)
        y = (torch.arange(batch) % self.null).to(self.bench.device)
        return noise, y

    def bf16_net(self, compile: bool = False) -> torch.nn.Module:
        """What dip-sample --compile and dip-eval --compile sample with (a bf16 copy, compiled)."""
        return prepare_for_sampling(self.net, dtype=torch.bfloat16, compile=compile,
                                    backend=self.bench.plan.compile_backend)

    def evaluations(self, cfg: SamplerConfig) -> int:
        """Network evaluations per image for one sample (a guided step runs cond and uncond)."""
        times = torch.linspace(0.0, 1.0, cfg.steps + 1).tolist()
        return sum(2 if cfg.guided(t) else 1 for t in times[:-1])

    def run(self, model, batch: int, cfg: SamplerConfig, amp, repeats: int) -> tuple[float, torch.Tensor]:
        """Median seconds of `repeats` timed samplings (after the caller's warm-up) and the last result."""
        noise, y = self.inputs(batch)
        times, x = [], None
        for _ in range(repeats):
            tb.synchronize(self.bench.device)
            t = time.perf_counter()
            x = sample(model, noise, y, cfg, self.null, autocast_dtype=amp)
            tb.synchronize(self.bench.device)
            times.append(time.perf_counter() - t)
        return statistics.median(times), x

    def report(self, what: str, seconds: float, batch: int, cfg: SamplerConfig, out=None, ref=None, note=""):
        b = self.bench
        full = self.evaluations(self.cfg) / self.evaluations(cfg)  # scale to a --sample-steps run
        img_s = batch / (seconds * full)
        flops = b.forward_flops * self.evaluations(self.cfg)
        latency = seconds * full if batch == 1 else None
        return b.row("sample " + ("compiled" if "compiled" in what else "eager"), what, img_s, b.mfu(img_s, flops),
                     latency, peak_gib(b.device), rel_diff(out, ref) if out is not None and ref is not None else None,
                     note)


def sample_eager_section(bench: Bench) -> None:
    p = bench.plan
    sm = Sampling(bench)
    bench.details["sampling"] = {"evaluations_per_image": sm.evaluations(sm.cfg), "steps": p.sample_steps,
                                 "guidance_scale": p.guidance_scale, "guidance_interval": p.guidance_interval}
    note = f"{p.sample_steps} steps, CFG {p.guidance_scale} on {list(p.guidance_interval)}"
    large_note = f"timed {p.sample_steps_large} steps, scaled to {p.sample_steps}"
    amp_label = "bf16 autocast" if sm.amp else "fp32"
    # Reference: float32 end to end at batch 1. What bf16 autocast changes in it is the rounding scale.
    _, ref32 = sm.run(sm.net, 1, sm.cfg, None, repeats=1)
    bf16 = sm.bf16_net()
    for label, model, amp in ((amp_label, sm.net, sm.amp), ("bf16 weights", bf16, None)):
        sm.run(model, 1, dataclasses.replace(sm.cfg, steps=2), amp, 1)  # warm-up
        reset_peak(bench.device)
        sec, out = sm.run(model, 1, sm.cfg, amp, repeats=2)
        sm.report(f"batch 1, {label}", sec, 1, sm.cfg, out, ref32, note + "; rel diff vs fp32")
    large_ref = None
    for label, model, amp in ((amp_label, sm.net, sm.amp), ("bf16 weights", bf16, None)):
        sm.run(model, p.sample_batch, dataclasses.replace(sm.cfg, steps=1), amp, 1)  # warm-up at this shape
        reset_peak(bench.device)
        sec, out = sm.run(model, p.sample_batch, sm.cfg_large, amp, repeats=1)
        sm.report(f"batch {p.sample_batch}, {label}", sec, p.sample_batch, sm.cfg_large, out, large_ref,
                  large_note + (f"; rel diff vs {amp_label}" if large_ref is not None else ""))
        large_ref = out if large_ref is None else large_ref
        free_memory()


def sample_compiled_section(bench: Bench, large: bool) -> None:
    """The product's compiled sampling (dip_scale.diffusion.sampler.prepare_for_sampling: bf16 weights,
    torch.compile, CUDA graphs on a GPU) at batch 1 or at the large batch."""
    p = bench.plan
    sm = Sampling(bench)
    batch = p.sample_batch if large else 1
    cfg = sm.cfg_large if large else sm.cfg
    _, ref = sm.run(sm.net, batch, cfg, sm.amp, repeats=1)  # eager bf16 autocast, the uncompiled path
    model = sm.bf16_net(compile=True)
    t = time.perf_counter()
    # Warm-up covers both shapes: unguided steps (t < lo) run the batch once, guided steps twice.
    warm = dataclasses.replace(sm.cfg, steps=10)
    for _ in range(3):  # CUDA graph trees record on the second call of a shape and replay from the third
        sm.run(model, batch, warm, None, 1)
    compile_s = time.perf_counter() - t
    reset_peak(bench.device)
    sec, out = sm.run(model, batch, cfg, None, repeats=1 if large else 3)
    graphs = model.cuda_graphs and p.gpu
    what = f"batch {batch}, compiled{' (CUDA graphs)' if graphs else ''}, bf16 w."
    note = f"compile + warm-up {compile_s:.0f} s; rel diff vs eager {'bf16 autocast' if sm.amp else 'fp32'}"
    if large:
        note += f"; timed {cfg.steps} steps, scaled to {p.sample_steps}"
    sm.report(what, sec, batch, cfg, out, ref, note)


# ----------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    a = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[6:]))
    a.add_argument("--cpu", action="store_true", help="CPU mode even where a GPU is visible (tiny defaults)")
    a.add_argument("--preset", help="model preset (GPU DiP-XL/16, CPU DiP-tiny/16)")
    a.add_argument("--image-size", type=int, help="pixels (GPU 256, CPU 32)")
    a.add_argument("--batch", type=int, help="training images per step (GPU 64, CPU 4)")
    a.add_argument("--warmup", type=int, help="untimed steps per round (GPU 2, CPU 1)")
    a.add_argument("--steps", type=int, help="timed training steps per round (GPU 8, CPU 2)")
    a.add_argument("--rounds", type=int, help="timed rounds per training path (GPU 3, CPU 1)")
    a.add_argument("--sample-steps", type=int, help="Euler steps of one sample (GPU 100, CPU 10)")
    a.add_argument("--sample-batch", type=int, help="the large sampling batch (GPU 128, CPU 4)")
    a.add_argument("--sample-steps-large", type=int, help="steps timed at the large batch (GPU 20, CPU 4)")
    a.add_argument("--guidance-scale", type=float, default=2.9)
    a.add_argument("--guidance-interval", type=float, nargs=2, default=(0.1, 1.0),
                   help="released configs (0.1, 1.0); the paper (0.11, 0.97)")
    a.add_argument("--memory-batches", help="comma list (GPU 32,64,128, CPU 2,4,8)")
    a.add_argument("--only", help=f"comma list of sections to run, of {','.join(SECTIONS)}")
    a.add_argument("--skip", help="comma list of sections to leave out")
    a.add_argument("--budget-s", type=float, help="skip sections that would end past this many seconds "
                   "(GPU 480, CPU 0 = no limit)")
    a.add_argument("--profile", action=argparse.BooleanOptionalAction, default=None,
                   help="profile a few bare steps per training section (default on a GPU)")
    a.add_argument("--compile-backend", default="inductor",
                   help="torch.compile backend of the sampling sections (aot_eager checks that path on a CPU)")
    a.add_argument("--threads", type=int, help="torch CPU threads (1 is steadier on a shared CPU)")
    a.add_argument("--out", help="folder for gpu_bench.json and profiles (default $OUT)")
    a.add_argument("--table-from", metavar="JSON", help="only print the table of a saved gpu_bench.json")
    return a.parse_args(argv)


def main(argv=None) -> Bench | None:
    a = parse_args(argv)
    if a.table_from:
        print(format_table(json.loads(Path(a.table_from).read_text())))
        return None
    if a.threads:
        torch.set_num_threads(a.threads)
    tb.quiet()
    plan = make_plan(a)
    if plan.gpu:
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 references stay fp32
    bench = Bench(plan)
    env = bench.details["environment"]
    print(f"gpu_bench: {plan.preset} at {plan.image_size} px on {env['device']}; python {env['python']}, torch "
          f"{env['torch']}, {', '.join(f'{k} {v}' for k, v in env['packages'].items())}", flush=True)
    print(f"sections {', '.join(plan.sections)}; budget {plan.budget_s or 'none'} s", flush=True)
    bench.section("memory", lambda: memory_section(bench))  # first: nothing else resident yet
    bench.section("train-eager", lambda: train_section(bench, compiled=False))
    bench.section("train-compiled", lambda: train_section(bench, compiled=True))
    bench.section("sample-eager", lambda: sample_eager_section(bench))
    bench.section("sample-compiled", lambda: sample_compiled_section(bench, large=False))
    bench.section("variants", lambda: variants_section(bench))
    bench.section("sample-compiled-large", lambda: sample_compiled_section(bench, large=True))
    bench.section("train-compiled-full", lambda: compiled_full_section(bench))
    bench.save()
    print(bench.table(), flush=True)
    if plan.out:
        (plan.out / "gpu_bench.txt").write_text(bench.table() + "\n")
    return bench


if __name__ == "__main__":
    bench = main()
    sys.exit(1 if bench is not None and bench.errors else 0)
