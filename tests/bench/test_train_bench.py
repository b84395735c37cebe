"""bench/train_bench.py: the Composer path and the bare loop do the same work, and the script reports both."""

from __future__ import annotations

import json
import re

import pytest
import torch

from dip_scale.models.dip import PRESETS, build_model
from dip_scale.train.callbacks.metrics import forward_flops


@pytest.fixture
def one_thread():
    # The tests share a small CPU with other jobs; one thread is much steadier than spinning OpenMP threads.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_composer_path_and_bare_loop_compute_the_same_training(bench_script, tmp_path, one_thread):
    """Same seed, batches and per-sample draws: after three steps both hold the same weights and EMA, so
    the ratio of their speeds measures overhead and nothing else."""
    tb = bench_script.load("train_bench.py")
    s = tb.StepSettings(image_size=32, batch=2, device_kind="cpu", ema_decay=0.5)
    composer, bare = tb.ComposerPath(s, tmp_path), tb.BareLoop(s)
    try:
        assert composer.run(1, 2) > 0 and bare.run(1, 2) > 0
        assert int(composer.trainer.state.timestamp.batch) == 3 == bare.step_count
        torch.manual_seed(s.seed)
        initial = build_model(s.net_config)
        model = composer.model
        for (name, a), b, c in zip(model.net.named_parameters(), bare.net.parameters(), initial.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
            assert not torch.equal(a, c), f"{name} did not train"
        for a, b in zip(model.ema_net.parameters(), bare.ema.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    finally:
        composer.close()


def test_script_prints_both_paths_and_the_overhead_ratio(bench_script, tmp_path):
    out = tmp_path / "result.json"
    done = bench_script.run("train_bench.py", "--device", "cpu", "--image-size", "32", "--batch", "2", "--warmup", "1",
                            "--steps", "1", "--rounds", "2", "--threads", "1", "--json", str(out))
    table = done.stdout
    assert re.search(r"^train step: DiP-tiny/16 at 32 px, batch 2, eager, fp32 on CPU", table, re.M)
    rates = {name: float(re.search(rf"^{name}\s+([\d.]+)\s", table, re.M).group(1)) for name in ("composer", "bare")}
    found = re.search(r"^overhead ratio \(bare / composer img/s\): ([\d.]+); median of the rounds' ratios: ([\d.]+)$",
                      table, re.M)
    ratio, paired = float(found.group(1)), float(found.group(2))

    result = json.loads(out.read_text())
    paths = result["paths"]
    for name in ("composer", "bare"):
        assert len(paths[name]["rounds"]) == 2 and all(r > 0 for r in paths[name]["rounds"])
        assert paths[name]["img_s"] == pytest.approx(rates[name], abs=0.01)
        assert paths[name]["mfu"] is None  # no peak FLOP/s on a CPU
    assert paths["overhead_ratio"] == pytest.approx(paths["bare"]["img_s"] / paths["composer"]["img_s"])
    assert ratio == pytest.approx(paths["overhead_ratio"], abs=1e-3)
    pairs = sorted(b / c for c, b in zip(paths["composer"]["rounds"], paths["bare"]["rounds"]))
    assert paired == pytest.approx(paths["paired_overhead_ratio"], abs=1e-3)
    assert paths["paired_overhead_ratio"] == pytest.approx(sum(pairs) / 2)  # the median of two rounds
    assert result["train_flops_per_image"] == 3 * forward_flops(PRESETS["DiP-tiny/16"], (32, 32))
