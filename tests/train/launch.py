"""Run the real trainer as the user does, in a subprocess: `python -m dip_scale.train` for one process,
the `composer` launcher for several. Helpers for reading what a run left behind."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "recipes" / "dip_tiny_cpu.yaml"
PLAIN = ["objective.repa.enabled=false", "eval.every=0", "logging.wandb.enabled=false", "train.compile=false",
         "logging.sample_every=0"]
"""The tiny twin without what a test of something else does not need (REPA's 346 MB encoder, the Slurm
evaluation, wandb, compilation, sample grids); tests/cluster/test_recipes.py runs it as written. A test's own
overrides come after these and win."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train(overrides: list[str], recipe: Path = TINY, nproc: int = 1, logs: Path | None = None,
          env: dict | None = None, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    """Train with `overrides`; nproc > 1 uses the composer launcher with gloo on CPU."""
    bin_dir = Path(sys.executable).parent
    if recipe == TINY:
        overrides = [*PLAIN, *overrides]
    if nproc == 1:
        cmd = [sys.executable, "-m", "dip_scale.train", str(recipe), *overrides]
    else:
        cmd = [str(bin_dir / "composer"), "-n", str(nproc), "--master_port", str(free_port())]
        if logs is not None:
            logs.mkdir(parents=True, exist_ok=True)
            cmd += ["--stdout", str(logs / "rank{rank}.out"), "--stderr", str(logs / "rank{rank}.err")]
        cmd += ["-m", "dip_scale.train", str(recipe), *overrides]
    full_env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", **(env or {})}
    proc = subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        extra = ""
        if logs is not None:
            extra = "".join(f"\n--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(logs.glob("rank*.err")))
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-5000:]}{extra}")
    return proc


def losses(run_dir: Path, key: str = "loss/train/total") -> dict[int, float]:
    """step -> logged loss, from the metrics.jsonl that rank 0 writes."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        out[record["step"]] = record[key]
    return out


def final_model(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    """Model tensors (net and EMA) of a run's step-N checkpoint (monolithic or sharded)."""
    from dip_scale.checkpoint import read_weights

    weights, saved_step = read_weights(run_dir / "checkpoints" / f"step-{step:09d}", trust=True)
    assert saved_step == step
    return weights
