"""The rectified-flow objective and the EMA."""

from __future__ import annotations

import torch

from dip_scale.diffusion.ema import ema_update, local_tensors, make_ema
from dip_scale.diffusion.flow import FlowMatching, sample_seeds, velocity_loss
from dip_scale.models import build_model


def test_interpolant_and_target():
    x, eps = torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2)
    t = torch.tensor([0.0, 0.25, 0.5, 1.0])
    x_t, v = FlowMatching.interpolate(x, eps, t)
    assert torch.allclose(x_t[0], eps[0]) and torch.allclose(x_t[3], x[3])  # t = 0 is noise, 1 is data
    assert torch.allclose(v, x - eps)


def test_t_is_logit_normal_and_labels_drop_at_the_given_rate():
    flow = FlowMatching(num_classes=10, label_dropout=0.1)
    torch.manual_seed(0)
    d = flow.draw((20000, 1, 1, 1), "cpu")
    logit = torch.log(d.t / (1 - d.t))
    assert abs(logit.mean()) < 0.03 and abs(logit.std() - 1) < 0.03
    assert abs(d.drop.float().mean() - 0.1) < 0.01


def test_per_sample_draws_do_not_depend_on_batch_composition():
    flow = FlowMatching(num_classes=10)
    seeds = sample_seeds(0, 3, torch.arange(8))
    full = flow.draw((8, 3, 4, 4), "cpu", seeds)
    part = flow.draw((3, 3, 4, 4), "cpu", seeds[5:])
    assert torch.equal(full.eps[5:], part.eps) and torch.equal(full.t[5:], part.t)
    assert sample_seeds(0, 3, torch.arange(2)) != sample_seeds(0, 4, torch.arange(2))  # new epoch, new noise


def test_loss_decreases_on_a_fixed_batch():
    torch.manual_seed(0)
    model = build_model("DiP-tiny/16")
    flow = FlowMatching(num_classes=10)
    y = torch.arange(8) % 10
    x = (torch.rand(8, 3, 1, 1) * 2 - 1).expand(8, 3, 32, 32)  # one flat colour per image
    seeds = sample_seeds(0, 0, torch.arange(8))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(60):
        inputs = flow.training_inputs(x, y, seeds)
        loss = velocity_loss(model(inputs.x_t, inputs.t, inputs.y), inputs.v)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0], losses[::10]


def test_ema_update_is_the_moving_average():
    net = torch.nn.Linear(3, 2)
    ema = make_ema(net)
    assert not any(p.requires_grad for p in ema.parameters())
    before = [p.clone() for p in ema.parameters()]
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    ema_update(local_tensors(ema), local_tensors(net), decay=0.9)
    for b, e, p in zip(before, ema.parameters(), net.parameters()):
        assert torch.allclose(e, 0.9 * b + 0.1 * p)
