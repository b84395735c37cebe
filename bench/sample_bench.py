"""Sampling throughput of the evaluation path (images/s), for sizing FID-50K jobs.

Times dip_scale.eval.generate.sample_images, the exact per-batch work of `dip-eval` (per-sample seeded
noise, batched cond/uncond CFG inside the guidance interval, Euler or Heun, uint8 output), on random
weights: speed does not depend on the values.

    python bench/sample_bench.py                                          # CPU: DiP-tiny/16, 64 px, 10 steps
    python bench/sample_bench.py --preset DiP-XL/16 --device cuda --batch-sizes 64 128 256
    python bench/sample_bench.py --preset DiP-XL/16 --device cuda --compile --batch-sizes 128

Prints one row per (batch size, compile) and the implied time of 50,000 samples on one device.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from dip_scale.diffusion.sampler import METHODS, SamplerConfig
from dip_scale.eval.generate import class_labels, default_autocast, sample_images
from dip_scale.models import PRESETS, build_model


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n")[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="DiP-tiny/16", choices=sorted(PRESETS))
    p.add_argument("--device", default="cpu")
    p.add_argument("--resolution", type=int, default=None, help="image side (default: 256 on GPU, 64 on CPU)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=None,
                   help="per-device batch sizes (default: 8 on CPU, 64 128 on GPU)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: 100 on GPU, 10 on CPU)")
    p.add_argument("--method", choices=METHODS, default="euler")
    p.add_argument("--guidance-scale", type=float, default=2.9)
    p.add_argument("--guidance-interval", type=float, nargs=2, default=(0.11, 0.97))
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto")
    p.add_argument("--compile", action="store_true", help="also time torch.compile (after a warm-up batch)")
    p.add_argument("--repeats", type=int, default=2, help="timed batches per configuration")
    p.add_argument("--json", default=None, help="also write the rows to this file")
    return p.parse_args(argv)


def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(net, batch_size: int, args, device, autocast, config) -> dict:
    kwargs = dict(null_class=config.num_classes, seed=0, sampler=args.sampler,
                  image_size=(args.resolution, args.resolution), device=device, autocast_dtype=autocast)

    def sample_batch(start: int):
        indices = range(start, start + batch_size)
        return sample_images(net, indices, class_labels(indices, config.num_classes), **kwargs)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    sample_batch(0)  # warm-up: kernels, autotuning, compilation
    sync(device)
    warmup = time.perf_counter() - t0
    t0 = time.perf_counter()
    for r in range(args.repeats):
        sample_batch((r + 1) * batch_size)
    sync(device)
    per_batch = (time.perf_counter() - t0) / args.repeats
    row = {"batch": batch_size, "img_s": batch_size / per_batch, "s_per_batch": per_batch, "warmup_s": warmup}
    if device.type == "cuda":
        row["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return row


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    args.steps = args.steps or (100 if gpu else 10)
    args.resolution = args.resolution or (256 if gpu else 64)
    args.sampler = SamplerConfig(steps=args.steps, method=args.method, guidance_scale=args.guidance_scale,
                                 guidance_interval=tuple(args.guidance_interval))
    batch_sizes = args.batch_sizes or ([64, 128] if gpu else [8])
    autocast = {"auto": default_autocast(device), "bf16": torch.bfloat16, "fp32": None}[args.precision]
    torch.manual_seed(0)
    model = build_model(args.preset).to(device).eval()
    config = model.config
    name = torch.cuda.get_device_name(device) if gpu else f"CPU ({torch.get_num_threads()} threads)"
    lo, hi = args.sampler.guidance_interval
    print(f"{args.preset} at {args.resolution}x{args.resolution} on {name}; {args.steps} {args.method} steps, "
          f"CFG {args.guidance_scale} on [{lo}, {hi}]; {'bf16 autocast' if autocast else 'fp32'}; torch "
          f"{torch.__version__}")
    variants = [("eager", model)] + ([("compiled", torch.compile(model, dynamic=False))] if args.compile else [])
    rows = []
    for label, net in variants:
        for b in batch_sizes:
            row = {"mode": label, **measure(net, b, args, device, autocast, config)}
            rows.append(row)
    header = f"{'mode':>9} {'batch':>6} {'img/s':>9} {'s/batch':>9} {'warm-up s':>10} {'50K on 1 device':>16}"
    if gpu:
        header += f" {'peak GiB':>9}"
    print(header)
    for r in rows:
        hours = 50_000 / r["img_s"] / 3600
        line = (f"{r['mode']:>9} {r['batch']:>6} {r['img_s']:>9.3f} {r['s_per_batch']:>9.3f} {r['warmup_s']:>10.1f} "
                f"{hours:>14.2f} h")
        if gpu:
            line += f" {r['peak_gib']:>9.1f}"
        print(line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"preset": args.preset, "device": name, "steps": args.steps, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
