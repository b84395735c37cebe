"""GuardedAdamW: the global gradient norm, skipped non-finite steps, and clipping (optim.grad_clip)."""

from __future__ import annotations

import pytest
import torch

from dip_scale.train.optim import GuardedAdamW


def model_and_grads(scale: float) -> torch.nn.Module:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    (net(torch.randn(32, 8)).square().sum() * scale).backward()
    return net


@pytest.mark.parametrize("scale", [100.0, 1e-3])
def test_clipping_matches_torch_clip_grad_norm_and_reports_the_norm_before_it(scale):
    ours, reference = model_and_grads(scale), model_and_grads(scale)
    opt = GuardedAdamW(list(ours.parameters()), lr=1e-2, max_grad_norm=1.0)
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-2)
    before = float(torch.nn.utils.clip_grad_norm_(reference.parameters(), 1.0))
    opt.step()
    ref_opt.step()
    assert opt.last_grad_norm == pytest.approx(before, rel=1e-6)
    assert (before > 1.0) == (scale == 100.0)  # one case clips, the other leaves the gradients alone
    for a, b in zip(ours.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_no_clipping_by_default_and_non_finite_steps_change_nothing():
    net, plain = model_and_grads(100.0), model_and_grads(100.0)
    opt = GuardedAdamW(list(net.parameters()), lr=1e-2)
    ref_opt = torch.optim.AdamW(plain.parameters(), lr=1e-2)
    opt.step()
    ref_opt.step()
    for a, b in zip(net.parameters(), plain.parameters()):
        torch.testing.assert_close(a, b)
    before = [p.detach().clone() for p in net.parameters()]
    next(net.parameters()).grad = torch.full_like(next(net.parameters()), float("nan"))
    opt.step()
    assert opt.last_step_skipped and opt.skipped_steps == 1
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))
    with pytest.raises(ValueError, match="max_grad_norm"):
        GuardedAdamW(list(net.parameters()), lr=1e-2, max_grad_norm=-1.0)


@pytest.mark.slow
def test_warmup_ramps_the_learning_rate_and_a_resumed_run_continues_it(tmp_path, epoch_shards):
    """optim.warmup_steps: the learning rate rises linearly to optim.lr, then stays; a run stopped inside the
    ramp and rerun (as `--steps N` or a requeue does) has every step's loss and learning rate of the
    uninterrupted one, and the same final weights."""
    from tests.train.runs import RUN_NAME, STEPS, assert_bitwise_equal, checkpoint_state, data_args, losses, run

    warm = ["optim.warmup_steps=8", "optim.lr=1e-3"]
    straight = tmp_path / "straight" / RUN_NAME
    run(tmp_path / "s", data_args(epoch_shards, straight.parent) + warm, straight)
    stopped = tmp_path / "stopped" / RUN_NAME
    run(tmp_path / "a", data_args(epoch_shards, stopped.parent) + warm + ["train.max_steps=4"], stopped)
    run(tmp_path / "b", data_args(epoch_shards, stopped.parent) + warm, stopped)

    lrs = losses(straight, key="train/lr")
    assert sorted(lrs) == list(range(1, STEPS + 1))
    ramp = [lrs[s] for s in sorted(lrs)]
    assert all(a < b for a, b in zip(ramp[:7], ramp[1:8])), ramp  # rising through the warm-up
    assert ramp[0] < 2e-4 and ramp[-1] == pytest.approx(1e-3), ramp
    assert losses(stopped, key="train/lr") == lrs
    assert losses(stopped) == losses(straight)
    assert_bitwise_equal(checkpoint_state(stopped, STEPS)["model"], checkpoint_state(straight, STEPS)["model"], "model")
