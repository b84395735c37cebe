"""bench/fig3_detail.py: its metrics measure what they claim, and the script runs end to end."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

TINY = ["--steps", "3", "--batch", "4", "--train-images", "8", "--eval-images", "4", "--hidden-size", "32",
        "--num-heads", "2", "--head-width", "8", "--num-samples", "2", "--sample-steps", "2", "--threads", "1"]


@pytest.fixture(scope="module")
def f3(bench_script):
    return bench_script.load("fig3_detail.py")


def test_high_frequency_energy_separates_detail_from_smooth_content(f3):
    size = 32
    mask = f3.high_pass(size, 0.25)
    i = torch.arange(size, dtype=torch.float64)
    smooth = torch.cos(2 * math.pi * 2 * i / size).expand(1, 3, size, size)  # 2 cycles per image
    checker = ((i[:, None] + i[None, :]) % 2 * 2 - 1).expand(1, 3, size, size)  # Nyquist in both axes
    assert f3.hf_energy(smooth, mask).item() == pytest.approx(0.0, abs=1e-6)
    # Parseval: all of the checkerboard's energy is high-frequency, sum |F|^2 = H * W * sum x^2.
    assert f3.hf_energy(checker, mask).item() == pytest.approx(size * size * checker.pow(2).sum().item())
    # Blurring a detailed image lowers its high-frequency energy ratio.
    x, _ = f3.load_images(0, 4, size, seed=0)
    blurred = torch.nn.functional.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)  # 3x3 box
    assert (f3.hf_energy(blurred, mask).sum() / f3.hf_energy(x, mask).sum()) < 0.5


def test_psnr_of_known_errors(f3):
    x = torch.zeros(2, 3, 8, 8)
    assert f3.psnr(x + 0.2, x) == pytest.approx(10 * math.log10(4 / 0.04))
    assert f3.psnr(x + 5.0, x) == pytest.approx(10 * math.log10(4 / 1.0))  # predictions are clipped to [-1, 1]


def test_models_share_the_trunk_and_the_deeper_baseline_is_at_least_as_large(f3):
    a = f3.parse_args(TINY)
    configs = f3.model_configs(a)
    assert list(configs) == ["DiT-only", "DiP", "DiT-only deeper"]
    dit, dip, deeper = configs.values()
    trunk = ("depth", "hidden_size", "num_heads", "patch_size", "num_classes")
    assert [getattr(dit, k) for k in trunk] == [getattr(dip, k) for k in trunk] and dip.patch_size == 16
    assert (dit.detailer_head, dip.detailer_head, deeper.detailer_head) == ("none", "unet", "none")
    assert f3.count_params(deeper) >= f3.count_params(dip) > f3.count_params(dit)
    assert deeper.depth > dit.depth and deeper.hidden_size == dit.hidden_size


def test_script_reports_every_model_at_every_t(bench_script, tmp_path):
    out, png = tmp_path / "fig3.json", tmp_path / "fig3.png"
    done = bench_script.run("fig3_detail.py", *TINY, "--times", "0.5,0.9", "--json", str(out), "--png", str(png))
    rows = [line for line in done.stdout.splitlines() if re.match(r"^(DiT-only|DiP)", line)]
    assert [r[:17].strip() for r in rows] == ["DiT-only", "DiP", "DiT-only deeper"]
    for r in rows:  # params, train s, loss, then PSNR, HF, HF err at each of 2 t, then the samples' HF
        assert len(r[17:].split()) == 3 + 3 * 2 + 1
    report = json.loads(out.read_text())
    for name, r in report["models"].items():
        assert set(r["per_t"]) == {"0.5", "0.9"}
        for m in r["per_t"].values():
            assert math.isfinite(m["psnr"]) and m["hf_ratio"] > 0 and m["hf_error"] > 0
        assert r["sample_hf_ratio"] > 0 and math.isfinite(r["final_loss"])
    from PIL import Image

    width, height = Image.open(png).size
    assert (width, height) == (2 * 2 * 64, 2 * len(report["png_rows"]) * 64)  # 2 images per row, 2x upscaled
