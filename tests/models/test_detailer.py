"""The heads of the paper's ablation and the head placements: locality, shapes at patch 16 and 32, the
parameter counts docs/dip.md states, the coordinate MLP's design, and where the mid-network head acts."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from dip_scale.models import PRESETS, build_model
from dip_scale.models.detailer import HEADS, CoordMLPDetailer, coordinate_features, make_head
from dip_scale.models.dip import ABLATIONS, head_token
from dip_scale.models.dit import patchify, unpatchify


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ----------------------------------------------------------------------------------------------------
# Every head reads only its own patch
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("patch", [16, 32])
@pytest.mark.parametrize("kind", HEADS)
def test_head_output_of_a_patch_depends_only_on_that_patch_and_its_token(kind, patch):
    """The gradient of one patch's output reaches that patch's pixels and token and nothing else: a patch
    learns about the rest of the image only through the trunk's token."""
    torch.manual_seed(0)
    head = make_head(kind, patch, hidden_size=32, width=8)
    patches = torch.randn(2, 3, 3 * patch * patch, requires_grad=True)
    s = torch.randn(2, 3, 32, requires_grad=True)
    out = head(patches, s)
    assert out.shape == patches.shape
    out[1, 2].square().sum().backward()
    for grad in (patches.grad, s.grad):
        assert grad[1, 2].abs().sum() > 0
        others = torch.ones(2, 3, dtype=torch.bool)
        others[1, 2] = False
        assert torch.count_nonzero(grad[others]) == 0


# ----------------------------------------------------------------------------------------------------
# Shapes: every head at every placement, patch 16 and 32, non-square images
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("patch", [16, 32])
@pytest.mark.parametrize("placement", ["end", "mid", "both"])
@pytest.mark.parametrize("kind", HEADS)
def test_every_head_and_placement_gives_velocity_and_token_grid(kind, placement, patch):
    torch.manual_seed(0)
    model = build_model("DiP-tiny/16", patch_size=patch, detailer_head=kind, head_placement=placement)
    x = torch.randn(2, 3, 2 * patch, 3 * patch)
    t, y = torch.rand(2), torch.tensor([0, 10])
    v, hidden = model.forward_with_hidden(x, t, y, block=1)
    assert v.shape == x.shape and torch.isfinite(v).all()
    assert hidden.shape == (2, 2, 3, 64)
    torch.testing.assert_close(model(x, t, y), v, rtol=0, atol=0)
    heads = {"end": ("detailer",), "mid": ("mid_detailer",), "both": ("detailer", "mid_detailer")}[placement]
    for name in ("detailer", "mid_detailer"):
        assert (getattr(model, name) is not None) == (name in heads)
    assert (model.final_layer is None) == (placement != "mid")


@pytest.mark.parametrize("name", [f"DiP-XL/16-{v}" for v in ABLATIONS] + [f"DiP-tiny/16-{v}" for v in ABLATIONS])
def test_ablation_presets_change_only_the_head(name):
    base = PRESETS[name.rsplit("-", 1)[0]]
    config = PRESETS[name]
    changed = {k for k in vars(base) if getattr(base, k) != getattr(config, k)}
    assert changed == set(ABLATIONS[name.rsplit("-", 1)[1]])


# ----------------------------------------------------------------------------------------------------
# Parameter counts (docs/dip.md states them for DiP-XL/16)
# ----------------------------------------------------------------------------------------------------


def expected_head_params(kind: str, P: int, D: int, w: int) -> int:
    """Parameter count of each head as docs/dip.md describes it, counted layer by layer."""
    patch_dim = 3 * P * P
    if kind == "unet":
        return 6_968_067 if (w, D) == (64, 1152) else None
    if kind == "mlp":
        W = 16 * w
        return (patch_dim + D) * W + W + W * W + W + W * patch_dim + patch_dim
    if kind == "attention":
        W = w
        block = 2 * W + (3 * W * W + 3 * W) + (W * W + W) + 2 * W + (4 * W * W + 4 * W) + (4 * W * W + W)
        return (3 * W + W) + (D * W + W) + P * P * W + 2 * block + 2 * W + (3 * W + 3)
    if kind == "coord_mlp":
        W, K = 4 * w, math.ceil(math.log2(P))
        return (D * W + W) + (2 + 4 * K) * W + 3 * W + 2 * (W * W + W) + (3 * W + 3)
    raise AssertionError(kind)


@pytest.mark.parametrize("patch", [16, 32])
@pytest.mark.parametrize("kind", HEADS)
def test_head_parameter_counts(kind, patch):
    with torch.device("meta"):
        head = make_head(kind, patch, hidden_size=1152, width=64)
    assert n_params(head) == expected_head_params(kind, patch, 1152, 64)


def test_xl16_parameter_counts_of_the_ablation_rows():
    """The numbers docs/dip.md gives for the ablation at the paper's size."""
    def count(name):
        with torch.device("meta"):
            model = build_model(name)
        return n_params(model), [n_params(h) for h in (model.detailer, model.mid_detailer) if h is not None]

    assert count("DiP-XL/16") == (631_989_411, [6_968_067])
    assert count("DiP-XL/16-mlp") == (628_825_248, [3_803_904])
    assert count("DiP-XL/16-attention") == (625_212_067, [190_723])
    assert count("DiP-XL/16-coord_mlp") == (625_454_243, [432_899])
    # mid: the head, its feedback Linear(768 -> 1152) and the DiT final layer; both: two heads and the feedback
    assert count("DiP-XL/16-mid") == (636_417_315, [6_968_067])
    assert count("DiP-XL/16-both") == (639_843_366, [6_968_067, 6_968_067])
    feedback = 768 * 1152 + 1152
    final_layer = 1152 * 2 * 1152 + 2 * 1152 + 1152 * 768 + 768
    assert count("DiP-XL/16-mid")[0] == count("DiP-XL/16")[0] + feedback + final_layer


# ----------------------------------------------------------------------------------------------------
# The coordinate MLP
# ----------------------------------------------------------------------------------------------------


def test_coordinate_features_are_pixel_centres_and_octaves_up_to_nyquist():
    f = coordinate_features(16)
    assert f.shape == (256, 2 + 4 * 4)
    u, v = f[:, 0].reshape(16, 16), f[:, 1].reshape(16, 16)
    assert torch.allclose(u[0], (torch.arange(16) + 0.5) / 8 - 1) and torch.equal(u[:, 3], u[0, 3].expand(16))
    assert torch.equal(v, u.T)  # row-major pixels: v is the row, u the column
    assert coordinate_features(32).shape == (1024, 2 + 4 * 5)
    # The top octave (sin(8 pi u) at P = 16) flips sign from pixel to pixel along a row: a 2-pixel period.
    top = f[:, 2 + 3].reshape(16, 16)[0]
    assert torch.all(top[:-1] * top[1:] < 0)


def test_coordinate_mlp_first_layer_is_a_linear_on_the_concatenation():
    """[token, position features, pixel RGB] -> Linear: the per-part sum computes exactly that."""
    torch.manual_seed(0)
    head = CoordMLPDetailer(patch_size=16, hidden_size=8, width=16)
    patches, s = torch.randn(2, 3, 768), torch.randn(2, 3, 8)
    weight = torch.cat([head.token_in.weight, head.coord_in.weight, head.pixel_in.weight], dim=1)  # (W, 8+18+3)
    pixels = patches.reshape(2, 3, 3, 256).transpose(2, 3)  # (B, N, L, 3)
    inputs = torch.cat([s[:, :, None].expand(2, 3, 256, 8), coordinate_features(16).expand(2, 3, 256, 18), pixels],
                       dim=-1)
    z = torch.nn.functional.silu(inputs @ weight.T + head.token_in.bias)
    for layer in head.hidden:
        z = torch.nn.functional.silu(layer(z))
    expected = head.out(z).transpose(2, 3).reshape(2, 3, 768)
    torch.testing.assert_close(head(patches, s), expected)


# ----------------------------------------------------------------------------------------------------
# Placements
# ----------------------------------------------------------------------------------------------------


def test_mid_head_acts_after_the_middle_block_and_feeds_the_trunk():
    """Blocks before the middle one do not see the head; the state after the middle block is that block's
    output plus the re-embedded output of the head run on it; the DiT final layer ends the network."""
    torch.manual_seed(0)
    model = build_model("DiP-tiny/16-mid", depth=4).eval()
    assert model.config.mid_block == 2 and model.detailer is None and model.final_layer is not None
    silent = copy.deepcopy(model)  # the same network with the feedback switched off
    with torch.no_grad():
        silent.mid_feedback.weight.zero_()
        silent.mid_feedback.bias.zero_()
    x, t, y = torch.randn(2, 3, 32, 48), torch.rand(2), torch.tensor([3, 10])
    hidden = {k: model.forward_with_hidden(x, t, y, block=k)[1] for k in (1, 2, 3)}
    plain = {k: silent.forward_with_hidden(x, t, y, block=k)[1] for k in (1, 2, 3)}
    assert torch.equal(hidden[1], plain[1])
    assert not torch.allclose(hidden[2], plain[2]) and not torch.allclose(hidden[3], plain[3])
    with torch.no_grad():
        patches = patchify(x, 16)
        _, _, t_emb = model.trunk.embed(patches, t, y)
        h2 = plain[2].flatten(1, 2)  # block 2's own output
        expected = h2 + model.mid_feedback(model.mid_detailer(patches, head_token(h2, t_emb)))
    torch.testing.assert_close(hidden[2].flatten(1, 2), expected)
    # Without the feedback, the network is DiT-only with the same trunk and final layer.
    dit = build_model("DiT-tiny/16", depth=4).eval()
    dit.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("mid_")})
    torch.testing.assert_close(silent(x, t, y), dit(x, t, y), rtol=0, atol=0)


def test_hidden_of_the_last_block_is_what_the_end_head_reads():
    torch.manual_seed(0)
    model = build_model("DiP-tiny/16-both").eval()
    x, t, y = torch.randn(1, 3, 32, 32), torch.rand(1), torch.tensor([4])
    with torch.no_grad():
        v, hidden = model.forward_with_hidden(x, t, y, block=model.config.depth)
        patches = patchify(x, 16)
        _, _, t_emb = model.trunk.embed(patches, t, y)
        out = model.detailer(patches, head_token(hidden.flatten(1, 2), t_emb))
    torch.testing.assert_close(unpatchify(out, 16, (2, 2)), v, rtol=0, atol=0)


def test_placement_errors_name_the_problem():
    with pytest.raises(ValueError, match="head_placement"):
        build_model("DiP-tiny/16", head_placement="middle")
    with pytest.raises(ValueError, match="needs a head"):
        build_model("DiT-tiny/16", head_placement="mid")
    with pytest.raises(ValueError, match="depth >= 2"):
        build_model("DiP-tiny/16", depth=1, head_placement="both")
    with pytest.raises(ValueError, match="within the model's 2 blocks"):
        build_model("DiP-tiny/16").forward_with_hidden(torch.zeros(1, 3, 16, 16), torch.zeros(1),
                                                       torch.zeros(1, dtype=torch.long), block=3)
