"""What a DiP-XL-sized checkpoint costs to write and to verify on this machine, and how much of it is hashing.

A state the size of DiP-XL/16 training (weights, EMA and AdamW's two moments in float32: 4 x 632M values,
about 10 GB; --gib to choose) is saved with torch.save as Composer does, then each file is hashed with the
digest the manifest uses (XXH3-128) and with SHA-256 (earlier manifests), and verified as a resume does it
(read back and hash). Prints one table; --json writes the numbers.

    python bench/checkpoint_bench.py                 # ~10 GB in the temp folder
    python bench/checkpoint_bench.py --gib 1 --dir /scratch
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from dip_scale.checkpoint.layout import file_digest

DIP_XL_PARAMS = 631_989_411


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gib", type=float, default=4 * DIP_XL_PARAMS * 4 / 2**30,
                   help="size of the state in GiB (default: DiP-XL/16 weights, EMA and two Adam moments, fp32)")
    p.add_argument("--dir", default=None, help="where to write (default: the temp folder)")
    p.add_argument("--json", default=None, help="also write the numbers to this file")
    return p.parse_args(argv)


def drop_page_cache(path: Path) -> None:
    """Evict the file from the page cache (so that a read is a read), where the OS allows it."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main(argv=None) -> int:
    args = parse_args(argv)
    folder = Path(tempfile.mkdtemp(prefix="ckpt-bench-", dir=args.dir))
    try:
        n = int(args.gib * 2**30 / 4)
        chunks = 4  # the four state tensors of a training checkpoint
        state = {f"tensor{i}": torch.randn(n // chunks) for i in range(chunks)}
        path = folder / "state.pt"

        def save():
            torch.save({"state": state}, path)
            fd = os.open(path, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)

        save_s, _ = timed(save)
        size = path.stat().st_size
        rows = {"write (torch.save + fsync)": save_s}
        for algorithm in ("xxh3_128", "sha256"):
            rows[f"hash {algorithm}, file in the page cache"] = timed(lambda a=algorithm: file_digest(path, a))[0]
            drop_page_cache(path)
            rows[f"verify {algorithm}: read from disk + hash"] = timed(lambda a=algorithm: file_digest(path, a))[0]
        gib = size / 2**30
        print(f"checkpoint of {gib:.2f} GiB ({os.cpu_count()} CPUs; {folder})")
        print(f"{'what':45s} {'seconds':>8s} {'GiB/s':>7s} {'% of write':>10s}")
        for what, sec in rows.items():
            print(f"{what:45s} {sec:8.2f} {gib / sec:7.2f} {100 * sec / save_s:9.0f}%")
        if args.json:
            Path(args.json).write_text(json.dumps({"gib": gib, "seconds": rows}, indent=1))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
