"""dip-sample: draw images from a trained DiP (our checkpoint, or the released weights).

Examples:
  dip-sample runs/dip-tiny-cpu --classes 0 3 7 --per-class 4 --out grid.png
  dip-sample s3://bucket/runs/dip-xl --classes 207 360 387 974 --guidance-scale 2.9 --out grid.png
  dip-sample DiP-XL-16.ckpt --official --classes 88 979 --steps 100 --out released.png
  dip-sample runs/dip-xl --num-samples 1000 --npz samples.npz     # ADM-evaluator layout: arr_0, arr_1
  dip-sample runs/dip-xl --num-samples 10000 --npz s.npz --batch-size 128 --compile   # GPU: bf16, CUDA graphs

Sampler settings default to the checkpoint's recipe; flags override them. bf16 autocast on GPU.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="dip-sample", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="run folder, checkpoint folder or file, s3:// URL, or released file with --official")
    p.add_argument("--official", action="store_true", help="the checkpoint is the authors' released file")
    p.add_argument("--trust-checkpoint", action="store_true", help="allow unpickling a released Lightning file")
    p.add_argument("--classes", type=int, nargs="+", help="class ids of the grid (default: 8 spread over the labels)")
    p.add_argument("--per-class", type=int, default=4, help="images per class in the grid (default 4)")
    p.add_argument("--out", default="samples.png", help="PNG grid to write (default samples.png)")
    p.add_argument("--num-samples", type=int, default=0, help="with --npz: class-balanced samples to write")
    p.add_argument("--npz", help="write samples as an ADM-evaluator .npz (uint8 NHWC arr_0, labels arr_1)")
    p.add_argument("--steps", type=int)
    p.add_argument("--method", choices=["euler", "heun"])
    p.add_argument("--guidance-scale", type=float)
    p.add_argument("--guidance-interval", type=float, nargs=2, metavar=("LO", "HI"))
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--compile", action="store_true",
                   help="bf16 weights and torch.compile (CUDA graphs on a GPU): pays off after the first minute")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from tqdm.auto import tqdm

    from dip_scale.diffusion.sampler import SamplerConfig, prepare_for_sampling, sample, sample_noise, to_uint8
    from dip_scale.inference import load_model
    from dip_scale.train.callbacks.sample_grid import image_grid

    try:
        model, info = load_model(args.checkpoint, official=args.official, trust_checkpoint=args.trust_checkpoint)
    except (FileNotFoundError, ValueError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    n_cls = info["num_classes"]
    classes = args.classes or [round(i * (n_cls - 1) / 7) for i in range(8)]
    bad = [c for c in classes if not 0 <= c < n_cls]
    if bad:
        print(f"error: --classes {bad} outside [0, {n_cls}) for this model", file=sys.stderr)
        return 2
    settings = dict(info["sampler"])
    for key in ("steps", "method", "guidance_scale", "guidance_interval"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    try:
        config = SamplerConfig(**{**settings, "guidance_interval": tuple(settings["guidance_interval"])})
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    model = model.to(device)
    amp = torch.bfloat16 if device.type == "cuda" else None
    if args.compile:
        model = prepare_for_sampling(model, dtype=amp, compile=True)
        amp = None  # the weights are cast already
    shape = (3, *info["image_size"])

    def generate(labels: list[int], offset: int, desc: str) -> torch.Tensor:
        out = []
        for i in tqdm(range(0, len(labels), args.batch_size), desc=desc):
            y = torch.tensor(labels[i:i + args.batch_size], device=device)
            noise = sample_noise(range(offset + i, offset + i + len(y)), shape, args.seed, device=device)
            out.append(to_uint8(sample(model, noise, y, config, n_cls, amp)).cpu())
        return torch.cat(out)

    grid_labels = [c for c in classes for _ in range(args.per_class)]
    images = generate(grid_labels, 0, "grid")
    grid = images.reshape(len(classes), args.per_class, *images.shape[1:]).transpose(0, 1).flatten(0, 1)
    image_grid(grid, columns=len(classes)).save(args.out)
    print(f"wrote {args.out} ({len(classes)} classes x {args.per_class}, step {info['step']}, {config})")
    if args.npz:
        if args.num_samples <= 0 or args.num_samples % n_cls:
            print(f"error: --num-samples must be a positive multiple of the {n_cls} classes", file=sys.stderr)
            return 2
        labels = [i % n_cls for i in range(args.num_samples)]
        arr = generate(labels, 10**9, "npz")  # indices apart from the grid's
        np.savez(args.npz, arr_0=arr.numpy(), arr_1=np.asarray(labels, dtype=np.int64))
        print(f"wrote {args.npz}: {args.num_samples} samples")
    return 0


if __name__ == "__main__":
    sys.exit(main())
