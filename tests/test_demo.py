"""The embedded default (`make demo`), shortened: data, training, scheduled FID, grids, and a rerun."""

from __future__ import annotations

import csv
import math
import subprocess
import sys
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SHORT = ["--steps", "20", "train.global_batch_size=8", "checkpoint.every=10", "eval.every=10",
         "eval.num_samples=20", "eval.batch_size=20", "logging.sample_every=10", "logging.progress_bar=false"]


def run_demo(out: Path) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "dip_scale.demo", "--out", str(out), *SHORT], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def test_demo_writes_shards_trains_evaluates_and_then_reports_complete(tmp_path):
    out = tmp_path / "demo"
    first = run_demo(out)
    assert (out / "data" / "train" / "index.json").is_file() and (out / "data" / "reference" / "index.json").is_file()
    run = out / "runs" / "demo"
    rows = list(csv.DictReader((run / "eval" / "results.csv").open()))
    assert [int(r["step"]) for r in rows] == [10, 20]  # the scheduled, in-process evaluation
    assert all(math.isfinite(float(r["fid"])) and float(r["fid"]) > 0 for r in rows)
    assert (run / "eval" / "fid_vs_step.png").is_file()
    sample_grid = Image.open(run / "samples" / "step-000000020.png")
    real_grid = Image.open(out / "real_classes.png")
    assert sample_grid.size == real_grid.size == (8 * 32, 2 * 32)  # same layout: one column per class
    assert "FID (random-feature Inception): step 10:" in first.stdout  # no real weights offline: says so
    assert "-> step 20:" in first.stdout

    again = run_demo(out)  # nothing left to do: reports the finished run, evaluates nothing new
    assert "already complete at step 20" in again.stdout + again.stderr
    assert len(list(csv.DictReader((run / "eval" / "results.csv").open()))) == 2
