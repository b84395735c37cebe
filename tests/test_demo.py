"""The embedded default (`make demo`), shortened: data, classifier, training, scheduled evaluation with class
accuracy, grids, the printed dip-sample / dip-eval commands, a rerun that trains nothing, and Ctrl-C while it
trains on."""

from __future__ import annotations

import csv
import json
import math
import os
import re
import shlex
import signal
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


def small_classifier(out: Path) -> None:
    """The demo trains its classifier once and keeps it; a smaller one here saves a minute of the suite."""
    from dip_scale.eval.classifier import train_classifier

    train_classifier(32, num_images=2000, epochs=1, held_out=200, log=lambda _: None).save(
        out / "data" / "classifier-32px.safetensors")


def test_demo_trains_evaluates_prints_working_commands_and_then_reports_complete(tmp_path):
    out = tmp_path / "demo"
    small_classifier(out)
    first = run_demo(out)
    assert (out / "data" / "train" / "index.json").is_file() and (out / "data" / "reference" / "index.json").is_file()
    run = out / "runs" / "demo"
    rows = list(csv.DictReader((run / "eval" / "results.csv").open()))
    assert [int(r["step"]) for r in rows] == [10, 20]  # the scheduled evaluation, beside training
    assert all(math.isfinite(float(r["fid"])) and float(r["fid"]) > 0 for r in rows)
    assert all(0.0 <= float(r["class_accuracy"]) <= 1.0 for r in rows)
    assert (run / "eval" / "fid_vs_step.png").is_file()
    sample_grid = Image.open(run / "samples" / "step-000000020.png")
    real_grid = Image.open(out / "real_classes.png")
    assert sample_grid.size == real_grid.size == (8 * 32, 2 * 32)  # same layout: one column per class
    text = first.stdout
    assert "FID*" in text and "random weights" in text  # no real Inception weights offline: says so
    table = [line.split() for line in text.splitlines() if line.strip().split()[:1] in (["10"], ["20"])]
    assert [row[0] for row in table] == ["10", "20"], text  # the whole table, one row per evaluation
    assert "real" in text and "held-out real images" in text

    # The closing commands work as printed (from the folder the demo ran in).
    lines = text.splitlines()
    at = lines.index("Sample from the run, and evaluate its last checkpoint again (the last row above):")
    sample_cmd, eval_cmd = lines[at + 1].strip(), lines[at + 2].strip()
    assert "dip-sample" in sample_cmd or "dip_scale.sample" in sample_cmd
    assert "--inception-weights" in eval_cmd and "--classifier" in eval_cmd
    done = subprocess.run(shlex.split(sample_cmd), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert sorted(Image.open(out / "samples.png").size) == [4 * 32, 10 * 32]  # 10 classes, 4 each
    done = subprocess.run(shlex.split(eval_cmd) + ["--no-progress", "--out", str(tmp_path / "again.json")],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    again = json.loads((tmp_path / "again.json").read_text())
    assert again["step"] == 20 and math.isclose(again["metrics"]["fid"], float(rows[-1]["fid"]), rel_tol=1e-3)
    assert math.isclose(again["metrics"]["class_accuracy"], float(rows[-1]["class_accuracy"]), abs_tol=1e-6)

    rerun = run_demo(out)  # nothing left to do: says so first, trains and evaluates nothing new
    assert rerun.stdout.splitlines()[0].startswith("run demo is already complete at step 20"), rerun.stdout[:500]
    assert "resuming" not in rerun.stdout + rerun.stderr
    assert len(list(csv.DictReader((run / "eval" / "results.csv").open()))) == 2

    # Ctrl-C while it trains on: the step in progress is checkpointed, the demo says where it stands (130, no
    # traceback), and the same command continues from that step to the end.
    more = [sys.executable, "-m", "dip_scale.demo", "--out", str(out), *SHORT, "--steps", "60", "eval.every=0",
            "logging.log_every=1"]
    with open(tmp_path / "ctrl-c.err", "w") as err:  # a file: a full stderr pipe would stall the demo
        demo = subprocess.Popen(more, cwd=ROOT, stdout=subprocess.PIPE, stderr=err, text=True,
                                start_new_session=True)
    seen = []
    for line in demo.stdout:
        seen.append(line)
        if line.startswith(("step 22/60", "step 23/60", "step 24/60")):
            for sig in (signal.SIGSTOP, signal.SIGINT, signal.SIGCONT):  # as a terminal's Ctrl-C, at this step
                os.killpg(demo.pid, sig)
            break
    stdout = demo.communicate(timeout=300)[0]
    stderr = (tmp_path / "ctrl-c.err").read_text()
    assert demo.returncode == 130, "".join(seen) + stdout[-2000:] + stderr[-3000:]
    assert "Traceback" not in stderr and "second signal" not in stdout + stderr, stderr[-3000:]
    stopped = re.search(r"demo stopped \(Ctrl-C\): the newest checkpoint is step (\d+)", stderr)
    assert stopped and 22 <= int(stopped.group(1)) < 60, stderr[-3000:]
    done = subprocess.run(more, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"resuming demo from step {stopped.group(1)}" in done.stdout + done.stderr
    assert "DiP demo:" in done.stdout and (run / "checkpoints" / "step-000000060" / "manifest.json").is_file()
