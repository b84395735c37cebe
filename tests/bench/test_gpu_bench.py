"""bench/gpu_bench.py and bench/gpu_check.sh in CPU mode: every section that needs no compiler runs end to
end, the table and the JSON hold the expected rows, the golden-equivalence numbers are at rounding level."""

from __future__ import annotations

import json
import sys

SMALLEST = ["--cpu", "--threads", "1", "--steps", "1", "--rounds", "1", "--sample-steps", "3", "--sample-batch", "2",
            "--sample-steps-large", "2", "--memory-batches", "1,2"]


def rows_by_key(details: dict) -> dict:
    return {(r["section"], r["what"]): r for r in details["rows"]}


def test_gpu_check_in_cpu_mode_measures_every_section_but_compiled_training(bench_script, tmp_path):
    # aot_eager: dynamo traces the compiled sampler as on a GPU, without running a C++ compiler on the CPU.
    args = SMALLEST + ["--skip", "train-compiled,sample-compiled-large", "--profile", "--compile-backend", "aot_eager"]
    done = bench_script.run("gpu_check.sh", env={"OUT": str(tmp_path), "PYTHON": sys.executable,
                                                  "BENCH_ARGS": " ".join(args)})
    assert "== machine" in done.stdout and "composer 0.32" in done.stdout
    assert not any(v.startswith("MISSING") for v in json.loads((tmp_path / "gpu_bench.json").read_text())
                   ["environment"]["packages"].values())
    table = (tmp_path / "gpu_bench.txt").read_text()
    assert done.stdout.rstrip().endswith(table.rstrip().splitlines()[-1])  # the table comes last
    details = json.loads((tmp_path / "gpu_bench.json").read_text())
    assert details["errors"] == [] and details["skipped"] == []
    rows = rows_by_key(details)

    # Training, eager: both paths with a speed, and their ratio.
    for path in ("composer", "bare"):
        r = rows[("train eager", f"{path}, batch 4")]
        assert r["img_s"] > 0 and r["seconds"] == 4 / r["img_s"]
    summary = details["train eager"]["summary"]
    assert rows[("train eager", "overhead ratio bare/composer")]["note"] == (
        f"{summary['overhead_ratio']:.3f} (median of round pairs {summary['paired_overhead_ratio']:.3f})")

    # Sampling: batch 1 and the large batch, float32 and bf16 weights; bf16 stays within rounding of fp32.
    for what in ("batch 1, fp32", "batch 1, bf16 weights", "batch 2, fp32", "batch 2, bf16 weights"):
        assert rows[("sample eager", what)]["img_s"] > 0
    assert rows[("sample eager", "batch 1, fp32")]["rel_diff"] == 0.0  # the reference itself
    assert 0 < rows[("sample eager", "batch 1, bf16 weights")]["rel_diff"] < 2e-2
    assert 0 < rows[("sample eager", "batch 2, bf16 weights")]["rel_diff"] < 2e-2
    assert rows[("sample eager", "batch 1, fp32")]["seconds"] > 0  # latency of one sample
    assert details["sampling"]["evaluations_per_image"] == 5  # 3 steps, t = 0 outside [0.1, 1]: 1 + 2 + 2

    # Compiled sampling (the CUDA-graph path on a GPU) gives the eager result to rounding.
    compiled = rows[("sample compiled", "batch 1, compiled, bf16 w.")]
    assert compiled["img_s"] > 0 and 0 < compiled["rel_diff"] < 2e-2

    # Memory: every batch, with and without activation checkpointing (no peak-memory counter on a CPU).
    for b in (1, 2):
        for ckpt in ("no", "with"):
            assert rows[("memory", f"batch {b}, {ckpt} act. ckpt")]["img_s"] > 0

    # Variants: the other AdamW kernel runs the same forward (the reference has an NCHW head: rounding).
    assert rows[("variants", "bare eager, plain")]["img_s"] > 0
    assert rows[("variants", "bare eager, fused AdamW")]["rel_diff"] < 1e-6  # channels-last head vs NCHW

    # The profile of the eager bare steps, by category.
    profile = details["profile"]["train eager"]["ms_per_step_by_category"]
    assert {"conv (head)", "matmul"} <= set(profile) and all(v > 0 for v in profile.values())
    assert (tmp_path / "profile_train_eager.txt").is_file()


def test_sections_that_do_not_fit_the_budget_are_skipped_and_listed(bench_script, tmp_path):
    done = bench_script.run("gpu_bench.py", *SMALLEST, "--only", "sample-compiled,memory", "--budget-s", "0.001",
                            "--out", str(tmp_path))
    details = json.loads((tmp_path / "gpu_bench.json").read_text())
    assert [s.split()[0] for s in details["skipped"]] == ["memory", "sample-compiled"]  # run order
    assert details["rows"] == []
    assert "skipped: sample-compiled" in done.stdout and "skipped: memory" in done.stdout
