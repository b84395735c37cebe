"""The sampler flags of dip-eval and dip-sample, and their one merge over a checkpoint's own settings."""

from __future__ import annotations

import argparse

from dip_scale.diffusion.sampler import METHODS, SamplerConfig


def add_sampler_flags(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """--steps, --method, --guidance-scale, --guidance-interval; each defaults to the checkpoint's recipe."""
    parser.add_argument("--steps", type=int, default=None, help="uniform ODE steps (default: the recipe's)")
    parser.add_argument("--method", choices=METHODS, default=None, help="ODE solver (default: the recipe's)")
    parser.add_argument("--guidance-scale", type=float, default=None,
                        help="classifier-free guidance scale, 1 = none (default: the recipe's)")
    parser.add_argument("--guidance-interval", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                        help="apply guidance while LO <= t <= HI (default: the recipe's)")


def sampler_from_flags(base: SamplerConfig, args: argparse.Namespace) -> SamplerConfig:
    """The checkpoint's settings with the flags given on top (checked: a bad value is a ValueError)."""
    interval = tuple(args.guidance_interval) if args.guidance_interval is not None else None
    return base.merged(steps=args.steps, method=args.method, guidance_scale=args.guidance_scale,
                       guidance_interval=interval)


def sampler_args(settings: SamplerConfig) -> list[str]:
    """The flags that reproduce `settings` (for a submitted evaluation job)."""
    lo, hi = settings.guidance_interval
    return ["--steps", str(settings.steps), "--method", settings.method, "--guidance-scale",
            str(settings.guidance_scale), "--guidance-interval", str(lo), str(hi)]
