"""dip-export: a run's network as weights people can share, in a Hugging Face model repository's layout.

Examples:
  dip-export runs/dip-xl exports/dip-xl                 # the newest intact checkpoint's EMA weights
  dip-export s3://bucket/runs/dip-xl/checkpoints/step-000800800 exports/dip-xl-800k
  dip-export runs/dip-xl-fsdp exports/x --trust-checkpoint   # sharded / DeepSpeed checkpoints (your own runs)
  huggingface-cli upload ORG/dip-xl-256 exports/dip-xl   # then: dip-sample hf://ORG/dip-xl-256 ...

The folder holds model.safetensors (tensors only: loading it runs no code), config.json (the network and
sampler settings) and a README.md; dip-sample and dip-eval load it, from disk or from the Hugging Face hub
cache (hf://ORG/NAME, offline).
"""

from __future__ import annotations

import argparse
import sys

from dip_scale.checkpoint import load_model, write_export
from dip_scale.storage import StoreUnavailable


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="dip-export", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="run folder, step-N checkpoint folder or file, or s3:// URL of one of them")
    p.add_argument("out", help="folder to write (model.safetensors, config.json, README.md)")
    p.add_argument("--live", action="store_true", help="export the live weights instead of the EMA weights")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="allow reading a checkpoint whose metadata only a full unpickling reads (sharded FSDP or "
                        "DeepSpeed checkpoints: runs code from the files, so only for checkpoints you trust)")
    p.add_argument("--cache-dir", default=None, help="where s3:// checkpoints are downloaded (default: a temp folder)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        model, info = load_model(args.checkpoint, trust=args.trust_checkpoint, use_ema=not args.live,
                                 cache_dir=args.cache_dir)
        out = write_export(model, info, args.out, use_ema=not args.live)
    except (FileNotFoundError, ValueError, PermissionError) as err:
        print(f"dip-export: error: {err}", file=sys.stderr)
        return 2
    except StoreUnavailable as err:
        print(f"dip-export: error: {err}", file=sys.stderr)
        return 75
    params = sum(p.numel() for p in model.parameters())
    print(f"wrote {out}: {'live' if args.live else 'EMA'} weights of step {info['step']} ({params:,} parameters)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
