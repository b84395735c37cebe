"""bench/head_ablation.py: its models are the paper's ablation rows on one trunk, its Frechet distance is
the FID's, and its CPU mode runs every variant end to end."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from dip_scale.eval.metrics import frechet_distance, mean_cov

TINY = ["--steps", "3", "--batch", "4", "--train-images", "8", "--eval-images", "4", "--hidden-size", "32",
        "--num-heads", "2", "--head-width", "8", "--fid-samples", "4", "--sample-steps", "2", "--jobs", "2",
        "--threads", "1"]


@pytest.fixture(scope="module")
def ablation(bench_script):
    return bench_script.load("head_ablation.py")


def test_models_are_the_paper_rows_on_one_trunk(ablation):
    configs = ablation.model_configs(ablation.parse_args(TINY))
    assert list(configs) == ["DiT-only", "DiT-only deeper", "mlp", "attention", "coord_mlp", "unet", "unet mid",
                             "unet both"]
    heads = {name: (c.detailer_head, c.head_placement) for name, c in configs.items()}
    assert heads == {"DiT-only": ("none", "end"), "DiT-only deeper": ("none", "end"), "mlp": ("mlp", "end"),
                     "attention": ("attention", "end"), "coord_mlp": ("coord_mlp", "end"), "unet": ("unet", "end"),
                     "unet mid": ("unet", "mid"), "unet both": ("unet", "both")}
    trunk = ("hidden_size", "num_heads", "patch_size", "num_classes", "detailer_width")
    assert len({tuple(getattr(c, k) for k in trunk) for c in configs.values()}) == 1
    assert len({c.depth for name, c in configs.items() if name != "DiT-only deeper"}) == 1
    deeper, dip = configs["DiT-only deeper"], configs["unet"]
    assert ablation.f3.count_params(deeper) >= ablation.f3.count_params(dip) > ablation.f3.count_params(
        configs["DiT-only"])


def test_frechet_distance_is_the_fid_of_the_features(ablation):
    g = torch.Generator().manual_seed(0)
    # More samples than dimensions: the eval package's FID (torch-fidelity, a D x D matrix square root).
    a, b = torch.randn(300, 16, generator=g), 0.7 * torch.randn(200, 16, generator=g) + 0.3
    expected = frechet_distance(*mean_cov(a), *mean_cov(b))
    assert ablation.frechet_distance(a, b) == pytest.approx(expected, rel=1e-8)
    # Fewer samples than dimensions, as in the benchmark: against tr((S1^1/2 S2 S1^1/2)^1/2) by eigh.
    a, b = torch.randn(20, 64, generator=g), torch.randn(30, 64, generator=g) + 0.5
    (mu1, s1), (mu2, s2) = mean_cov(a), mean_cov(b)
    w, V = np.linalg.eigh(s1)
    root1 = (V * np.sqrt(w.clip(0))) @ V.T
    cross = np.sqrt(np.linalg.eigvalsh(root1 @ s2 @ root1).clip(0)).sum()
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * cross
    # (the square roots of the ~1e-15 eigenvalues that rank deficiency leaves make eigh's answer the less exact)
    assert ablation.frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)
    assert ablation.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)


def test_cpu_mode_trains_and_measures_every_variant(bench_script, tmp_path):
    out = tmp_path / "ablation.json"
    done = bench_script.run("head_ablation.py", *TINY, "--times", "0.5,0.9", "--work-dir", str(tmp_path),
                            "--json", str(out))
    lines = done.stdout.splitlines()
    rows = [line for line in lines if line[:16].strip() in
            ("DiT-only", "DiT-only deeper", "mlp", "attention", "coord_mlp", "unet", "unet mid", "unet both")]
    assert [r[:16].strip() for r in rows] == ["DiT-only", "DiT-only deeper", "mlp", "attention", "coord_mlp",
                                              "unet", "unet mid", "unet both"]
    for r in rows:  # params, CPU s, loss, PSNR and HF error at 2 t, FID, paper FID
        assert len(r[16:].split()) == 3 + 2 * 2 + 2
    assert rows[0].split()[-1] == "5.28" and rows[1].split()[-1] == "-" and rows[-1].split()[-1] == "3.53"
    assert "random-feature Inception" in done.stdout or "real Inception" in done.stdout
    assert lines[-1].startswith("total ") and "2 job(s)" in lines[-1]
    report = json.loads(out.read_text())
    assert set(report["models"]) == set(ablation_rows := [r[:16].strip() for r in rows])
    for name in ablation_rows:
        r = report["models"][name]
        assert set(r["per_t"]) == {"0.5", "0.9"} and math.isfinite(r["final_loss"]) and r["cpu_s"] > 0
        assert all(math.isfinite(m["psnr"]) and m["hf_error"] > 0 for m in r["per_t"].values())
        assert math.isfinite(r["fid"]) and r["fid"] > 0
    assert report["cpu_s"] >= sum(r["cpu_s"] for r in report["models"].values())


def test_a_stopped_run_continues_from_the_kept_models(bench_script, tmp_path):
    keep = tmp_path / "kept"
    first = bench_script.run("head_ablation.py", *TINY, "--models", "unet,DiT-only", "--keep", str(keep))
    assert sorted(p.name for p in keep.glob("*.pt")) == ["DiT-only.pt", "unet.pt"]
    rows = {line[:16].strip(): line for line in first.stdout.splitlines()}
    # The run goes on with one more model: the two kept ones are reused (same numbers), only mlp trains.
    second = bench_script.run("head_ablation.py", *TINY, "--models", "mlp,unet,DiT-only", "--keep", str(keep))
    assert "DiT-only: reusing" in second.stdout and "unet: reusing" in second.stdout
    assert "mlp: loss" in second.stdout and "unet: loss" not in second.stdout
    again = {line[:16].strip(): line for line in second.stdout.splitlines()}
    assert [n for n in again if n in ("DiT-only", "mlp", "unet")] == ["DiT-only", "mlp", "unet"]  # paper order
    for name in ("DiT-only", "unet"):
        assert again[name] == rows[name]  # params, CPU s, loss, one-step numbers, FID: all the kept ones
    # Other settings: refused with the file and the setting named, nothing trained.
    other = bench_script.run("head_ablation.py", *[v if v != "3" else "4" for v in TINY], "--models", "unet",
                             "--keep", str(keep), check=False)
    assert other.returncode == 2 and "Traceback" not in other.stderr
    assert "unet.pt was made with other settings: --steps 3 (now 4)" in other.stderr
