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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train(overrides: list[str], recipe: Path = TINY, nproc: int = 1, logs: Path | None = None,
          env: dict | None = None, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    """Train with `overrides`; nproc > 1 uses the composer launcher with gloo on CPU."""
    bin_dir = Path(sys.executable).parent
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
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}{extra}")
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
    from dip_scale.inference import _model_state

    weights, saved_step = _model_state(run_dir / "checkpoints" / f"step-{step:09d}")
    assert saved_step == step
    return weights
