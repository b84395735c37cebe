"""The DiP network: exact sizes, patch order, RoPE, presets, head locality, errors, and equivalence with
an independent reference written from the released design."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dip_scale.models import PRESETS, DiPConfig, build_model
from dip_scale.models.dit import apply_rope, patchify, rope_angles, unpatchify
from dip_scale.models.official import (
    convert_official_state_dict,
    infer_config,
    load_official_checkpoint,
    to_official_state_dict,
)
from tests.models.reference_dip import RefDiP


def n_params(name: str) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in build_model(name).parameters())


def test_parameter_counts_match_the_paper():
    assert n_params("DiP-XL/16") == 631_989_411
    with torch.device("meta"):
        m = build_model("DiP-XL/16")
    assert sum(p.numel() for p in m.detailer.parameters()) == 6_968_067
    assert sum(p.numel() for p in m.trunk.blocks.parameters()) == 621_357_984
    assert round(n_params("DiT-XL/16") / 1e6, 2) == 628.56


def test_paper_ablation_sizes():
    def count(**kw):
        with torch.device("meta"):
            return sum(p.numel() for p in build_model("DiT-XL/16", **kw).parameters())

    assert round(count(depth=32) / 1e6) == 772
    assert round(count(hidden_size=1280) / 1e6) == 776
    assert round(count(hidden_size=1536) / 1e9, 1) == 1.1


def test_patchify_matches_unfold_and_round_trips():
    x = torch.randn(2, 3, 32, 48)
    tokens = patchify(x, 16)
    assert torch.equal(tokens, F.unfold(x, 16, stride=16).transpose(1, 2))
    assert torch.equal(unpatchify(tokens, 16, (2, 3)), x)


def test_rope_depends_only_on_relative_position():
    h, w, d = 5, 7, 8
    angles = rope_angles((h, w), d)
    cos, sin = angles.cos(), angles.sin()
    q = torch.randn(d)
    k = torch.randn(d)
    qs = apply_rope(q.expand(1, 1, h * w, d).clone(), cos, sin)[0, 0]
    ks = apply_rope(k.expand(1, 1, h * w, d).clone(), cos, sin)[0, 0]

    def dot(a, b):
        return float(qs[a[0] * w + a[1]] @ ks[b[0] * w + b[1]])

    # Shifting both tokens by the same grid offset keeps q.k; a different offset changes it.
    assert dot((0, 0), (2, 3)) == pytest.approx(dot((1, 2), (3, 5)), abs=1e-5)
    assert dot((1, 1), (1, 4)) == pytest.approx(dot((3, 2), (3, 5)), abs=1e-5)
    assert abs(dot((0, 0), (2, 3)) - dot((0, 0), (3, 2))) > 1e-4
    # A rotation preserves norms.
    assert torch.allclose(qs.norm(dim=-1), q.norm().expand(h * w), atol=1e-5)


def test_rope_positions_are_scaled_to_0_16_and_interleave_x_y():
    angles = rope_angles((2, 3), 8)  # f = [1, 0.01]
    # token 5 = row 1, col 2: x = 16, y = 16; pairs: x*f0, y*f0, x*f1, y*f1
    assert torch.allclose(angles[5], torch.tensor([16.0, 16.0, 0.16, 0.16]))
    # token 1 = row 0, col 1: x = 8, y = 0
    assert torch.allclose(angles[1], torch.tensor([8.0, 0.0, 0.08, 0.0]))


@pytest.mark.parametrize("name", sorted(PRESETS))
@pytest.mark.parametrize("size", [256, 512])
def test_every_preset_gives_velocity_of_the_input_shape(name, size):
    with torch.device("meta"):
        model = build_model(name)
        x = torch.zeros(2, 3, size, size)
        v = model(x, torch.zeros(2), torch.zeros(2, dtype=torch.long))
    assert v.shape == x.shape


@pytest.mark.parametrize("head", ["unet", "mlp", "attention", "none"])
def test_head_variants_run_on_non_square_images(head):
    model = build_model("DiP-tiny/16", detailer_head=head)
    x = torch.randn(2, 3, 32, 64)
    v = model(x, torch.rand(2), torch.tensor([0, 10]))
    assert v.shape == x.shape and torch.isfinite(v).all()


@pytest.mark.parametrize("head", ["unet", "mlp", "attention"])
def test_head_sees_only_its_own_patch(head):
    """With the DiT tokens fixed, changing another patch's pixels leaves a patch's output unchanged."""
    model = build_model("DiP-tiny/16", detailer_head=head).eval()
    x = torch.randn(1, 3, 32, 32)
    patches = patchify(x, 16)  # (1, 4, 768)
    s = torch.randn(1, 4, 64)
    out = model.detailer(patches, s)
    changed = patches.clone()
    changed[0, 3] = torch.randn(768)
    out2 = model.detailer(changed, s)
    assert torch.equal(out[0, :3], out2[0, :3])
    assert not torch.allclose(out[0, 3], out2[0, 3])
    # Through the full model, other patches do matter, via attention among DiT tokens.
    y, t = torch.tensor([1]), torch.tensor([0.5])
    x2 = x.clone()
    x2[..., 16:, 16:] += 1.0
    assert not torch.equal(model(x, t, y)[..., :16, :16], model(x2, t, y)[..., :16, :16])


def randomize(model):
    """Give every parameter (norm weights too) random values so the comparison exercises all of them."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name:
                p.copy_(1 + 0.3 * noise)
            else:
                p.copy_(noise * (0.1 if p.ndim == 1 else 1 / p[0].numel() ** 0.5))
    return model


@pytest.mark.parametrize("patch,size", [(16, (32, 48)), (16, (64, 16)), (32, (64, 96))])
def test_converted_weights_compute_the_reference_function(patch, size):
    config = DiPConfig(depth=2, hidden_size=64, num_heads=2, patch_size=patch, num_classes=10, detailer_width=8)
    ours = randomize(build_model(config)).eval()
    ref = RefDiP(2, 64, 2, patch, 10, base=8).eval()
    ref.load_state_dict(to_official_state_dict(ours.state_dict()), strict=True)
    # ...and back through the converter, as a user loading the released file would.
    ours2 = build_model(infer_config(ref.state_dict()))
    ours2.load_state_dict(convert_official_state_dict(ref.state_dict()), strict=True)
    x = torch.rand(3, 3, *size) * 2 - 1
    t = torch.tensor([0.0, 0.37, 1.0])
    y = torch.tensor([0, 5, 10])
    with torch.no_grad():
        expected = ref(x, t, y)
        got = ours2(x, t, y)
    scale = expected.abs().max()
    assert 1e-2 < scale < 1e3
    assert (got - expected).abs().max() <= 2e-6 * scale, ((got - expected).abs().max(), scale)


def test_converter_prefers_ema_weights_in_a_lightning_checkpoint(tmp_path):
    ours = build_model("DiP-tiny/16")
    official = to_official_state_dict(ours.state_dict())
    noisy = {k: v + 1 for k, v in official.items()}
    ckpt = {"state_dict": {**{f"denoiser.{k}": v for k, v in noisy.items()},
                           **{f"ema_denoiser.{k}": v for k, v in official.items()},
                           "ema_denoiser.projectors.0.weight": torch.zeros(3)}, "epoch": 3}
    with pytest.warns(UserWarning):
        converted = convert_official_state_dict(ckpt)
    assert all(torch.equal(converted[k], v) for k, v in ours.state_dict().items())
    torch.save(ckpt, tmp_path / "released.ckpt")
    loaded = load_official_checkpoint(tmp_path / "released.ckpt")
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in ours.state_dict().items())


def test_converter_names_missing_and_misshaped_keys():
    official = to_official_state_dict(build_model("DiP-tiny/16").state_dict())
    missing = dict(official)
    del missing["blocks.1.attn.q_norm.weight"]
    with pytest.raises(KeyError, match="blocks.1.attn.q_norm.weight"):
        convert_official_state_dict(missing)
    bad = dict(official)
    bad["blocks.0.mlp.w2.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match="blocks.0.mlp.w2.weight"):
        convert_official_state_dict(bad)
    with pytest.raises(KeyError, match="s_embedder.proj.weight"):
        convert_official_state_dict({"foo": torch.zeros(1)})


def test_bad_inputs_say_what_was_expected():
    model = build_model("DiP-tiny/16")
    with pytest.raises(ValueError, match="not divisible by the patch size 16"):
        model(torch.zeros(1, 3, 30, 32), torch.zeros(1), torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match=r"class ids must be in \[0, 10\]"):
        model(torch.zeros(1, 3, 32, 32), torch.zeros(1), torch.tensor([11]))
    with pytest.raises(ValueError, match="unknown model preset 'DiP-XXL/16'"):
        build_model("DiP-XXL/16")
    with pytest.raises(ValueError, match="detailer_head"):
        build_model("DiP-tiny/16", detailer_head="coordinate")
    with pytest.raises(ValueError, match="patch_size divisible by 16"):
        build_model("DiP-tiny/16", patch_size=8)


def test_initialisation_follows_the_release():
    model = build_model("DiP-B/16")
    assert torch.count_nonzero(model.trunk.s_embedder.proj.bias) == 0
    std = model.trunk.y_embedder.embedding_table.weight.std().item()
    assert 0.018 < std < 0.022
    assert 0.018 < model.trunk.t_embedder.mlp[0].weight.std().item() < 0.022
    # adaLN is not zero-initialised (unlike DiT).
    assert torch.count_nonzero(model.trunk.blocks[0].adaLN_modulation.weight) > 0


def test_channels_last_head_weights_compute_the_same_function():
    from dip_scale.models import channels_last_weights

    torch.manual_seed(0)
    net = build_model("DiP-tiny/16")
    x, t, y = torch.randn(2, 3, 32, 48), torch.rand(2), torch.tensor([1, 10])
    ref = net(x, t, y)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    assert channels_last_weights(net) is net
    conv = net.detailer.enc2[0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    torch.testing.assert_close(net(x, t, y), ref, rtol=1e-5, atol=1e-6)
    net.load_state_dict(state)  # a checkpoint written with NCHW weights loads into NHWC ones
    assert net.detailer.enc2[0].weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(net(x, t, y), ref, rtol=1e-5, atol=1e-6)
