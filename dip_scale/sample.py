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

import torch

from dip_scale.checkpoint import load_model
from dip_scale.diffusion.sampler import prepare_for_sampling
from dip_scale.eval.flags import add_sampler_flags, sampler_from_flags
from dip_scale.eval.generate import default_autocast, generate, sample_images
from dip_scale.eval.grid import class_columns, default_classes, image_grid
from dip_scale.eval.results import save_samples_npz


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dip-sample", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint",
                   help="run folder, checkpoint folder or file, s3:// URL, or the released file with --official")
    p.add_argument("--official", action="store_true", help="the checkpoint is the authors' released file")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="allow a checkpoint that only a full unpickling reads (runs code from the file: only for "
                        "files you trust, e.g. your own run's sharded or DeepSpeed checkpoints)")
    p.add_argument("--classes", type=int, nargs="+", help="class ids of the grid (default: 8 spread over the labels)")
    p.add_argument("--per-class", type=int, default=4, help="images per class in the grid (default 4)")
    p.add_argument("--out", default="samples.png", help="PNG grid to write (default samples.png)")
    p.add_argument("--num-samples", type=int, default=0,
                   help="with --npz: how many class-balanced samples to write (a multiple of the classes)")
    p.add_argument("--npz", help="write samples as an ADM-evaluator .npz (uint8 NHWC arr_0, labels arr_1); they are "
                                 "the samples dip-eval draws with the same --seed")
    add_sampler_flags(p.add_argument_group("sampler (default: the recipe's, from the checkpoint)"))
    p.add_argument("--batch-size", type=int, default=32, help="samples per forward (default 32)")
    p.add_argument("--compile", action="store_true",
                   help="bf16 weights and torch.compile (CUDA graphs on a GPU): pays off after the first minute")
    p.add_argument("--seed", type=int, default=0, help="sample i uses the noise of (seed, i) (default 0)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device (default: cuda when a GPU is visible, else cpu)")
    return p


def parse_args(argv=None):
    return build_parser().parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        model, info = load_model(args.checkpoint, official=args.official, trust=args.trust_checkpoint)
        n_cls = info["num_classes"]
        classes = args.classes or default_classes(n_cls)
        bad = [c for c in classes if not 0 <= c < n_cls]
        if bad:
            raise ValueError(f"--classes {bad} are outside [0, {n_cls}) for this model")
        if args.npz and (args.num_samples <= 0 or args.num_samples % n_cls):
            raise ValueError(f"--num-samples must be a positive multiple of the {n_cls} classes, got "
                             f"{args.num_samples}")
        if args.per_class <= 0 or args.batch_size <= 0:
            raise ValueError("--per-class and --batch-size must be positive")
        sampler = sampler_from_flags(info["sampler"], args)
    except (FileNotFoundError, ValueError, PermissionError) as err:
        print(f"dip-sample: error: {err}", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    model = model.to(device)
    amp = default_autocast(device)
    net = model
    if args.compile:
        net = prepare_for_sampling(model, dtype=amp, compile=True)
        amp = None  # the weights are cast already
    size = tuple(info["image_size"])

    grid_labels = torch.tensor([c for c in classes for _ in range(args.per_class)])
    images = torch.cat([
        sample_images(net, range(i, min(i + args.batch_size, len(grid_labels))), grid_labels[i:i + args.batch_size],
                      seed=args.seed, sampler=sampler, image_size=size, device=device, autocast_dtype=amp,
                      null_class=n_cls).cpu()
        for i in range(0, len(grid_labels), args.batch_size)])
    grid = class_columns(images, len(classes))
    image_grid(grid, columns=len(classes)).save(args.out)
    print(f"wrote {args.out} ({len(classes)} classes x {args.per_class}, step {info['step']}, {sampler})")
    if args.npz:
        batches = list(generate(net, num_samples=args.num_samples, seed=args.seed, sampler=sampler,
                                batch_size=args.batch_size, device=device, image_size=size, autocast_dtype=amp,
                                progress=sys.stderr.isatty()))
        save_samples_npz(args.npz, torch.cat([b.images.cpu() for b in batches]).numpy(),
                         torch.cat([b.labels for b in batches]).numpy())
        print(f"wrote {args.npz}: {args.num_samples} samples")
    return 0


if __name__ == "__main__":
    sys.exit(main())
