"""The ODE sampler: exact on fields it must integrate exactly, guidance only inside its interval,
per-sample determinism."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dip_scale.diffusion.sampler import SamplerConfig, sample, sample_noise, to_uint8


class Field(nn.Module):
    """v(x, t, y) = a + b * t + c * y, independent of x; records the batch size of every call."""

    def __init__(self, a=0.3, b=-1.2, c=0.0):
        super().__init__()
        self.a, self.b, self.c = a, b, c
        self.calls: list[tuple[float, int]] = []

    def forward(self, x, t, y):
        self.calls.append((float(t[0]), x.shape[0]))
        return (self.a + self.b * t + self.c * y.float()).view(-1, 1, 1, 1).expand_as(x)


def test_euler_is_exact_for_a_constant_field_and_heun_for_an_affine_one():
    x0 = torch.randn(2, 3, 4, 4)
    y = torch.zeros(2, dtype=torch.long)
    euler = sample(Field(b=0.0), x0, y, SamplerConfig(steps=7), null_class=10)
    assert torch.allclose(euler, x0 + 0.3, atol=1e-6)
    # x(1) = x0 + a + b/2 for v = a + b t: Heun (trapezoid) is exact, Euler is not.
    heun = sample(Field(), x0, y, SamplerConfig(steps=5, method="heun"), null_class=10)
    assert torch.allclose(heun, x0 + 0.3 - 0.6, atol=1e-6)
    euler = sample(Field(), x0, y, SamplerConfig(steps=5), null_class=10)
    assert not torch.allclose(euler, x0 + 0.3 - 0.6, atol=1e-3)


def test_guidance_runs_cond_and_uncond_only_inside_the_interval():
    field = Field(b=0.0, c=1.0)
    x0 = torch.zeros(3, 3, 2, 2)
    y = torch.tensor([1, 2, 3])
    cfg = SamplerConfig(steps=10, guidance_scale=3.0, guidance_interval=(0.25, 0.75))
    out = sample(field, x0, y, cfg, null_class=0)
    doubled = [t for t, n in field.calls if n == 6]
    single = [t for t, n in field.calls if n == 3]
    assert doubled == pytest.approx([0.3, 0.4, 0.5, 0.6, 0.7])
    assert single == pytest.approx([0.0, 0.1, 0.2, 0.8, 0.9])
    # Inside: v = v_u + 3 (v_c - v_u) = 0.3 + 3 y (null class 0 gives c*y = 0); outside: 0.3 + y.
    expected = 0.3 + y.float() * (0.5 * 3 + 0.5 * 1)
    assert torch.allclose(out[:, 0, 0, 0], expected, atol=1e-5)


def test_noise_depends_only_on_seed_and_index():
    a = sample_noise([0, 1, 2, 3], (3, 8, 8), seed=5)
    b = sample_noise([2, 3], (3, 8, 8), seed=5)
    assert torch.equal(a[2:], b)
    assert not torch.equal(a[:2], sample_noise([0, 1], (3, 8, 8), seed=6))


def test_bad_sampler_settings_are_rejected():
    with pytest.raises(ValueError, match="method"):
        SamplerConfig(method="rk4")
    with pytest.raises(ValueError, match="guidance_interval"):
        SamplerConfig(guidance_interval=(0.9, 0.1))


def test_to_uint8_is_the_adm_layout():
    img = torch.tensor([-1.0, 0.0, 1.0, 2.0]).view(1, 1, 2, 2).expand(1, 3, 2, 2)
    out = to_uint8(img)
    assert out.shape == (1, 2, 2, 3) and out.dtype == torch.uint8
    assert out[0, :, :, 0].flatten().tolist() == [0, 128, 255, 255]


def test_prepared_network_samples_what_the_model_does():
    from dip_scale.diffusion.sampler import prepare_for_sampling
    from dip_scale.models.dip import build_model

    torch.manual_seed(0)
    model = build_model("DiP-tiny/16").eval()
    cfg = SamplerConfig(steps=4, guidance_scale=2.0, guidance_interval=(0.3, 1.0))  # both batch shapes
    noise, y = sample_noise(range(2), (3, 32, 32), seed=1), torch.tensor([1, 4])
    ref = sample(model, noise, y, cfg, null_class=10)

    # bf16 weights on a copy: the model keeps its float32 weights; the samples differ by bf16 rounding only.
    bf16 = prepare_for_sampling(model, dtype=torch.bfloat16)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    out = sample(bf16, noise, y, cfg, null_class=10)
    assert out.dtype == torch.float32
    assert 0 < ((out - ref).norm() / ref.norm()).item() < 2e-2

    # Compiled (aot_eager: the torch.compile path without a C++ toolchain): the same samples.
    compiled = prepare_for_sampling(model, compile=True, backend="aot_eager")
    torch.testing.assert_close(sample(compiled, noise, y, cfg, null_class=10), ref, rtol=1e-5, atol=1e-5)
    assert prepare_for_sampling(model) is model  # nothing asked, nothing changed
