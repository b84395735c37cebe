"""REPA: the DINOv2 encoder's names and size, loading without network, target shapes, the loss and its
gradients, and what REPA keeps out of its state dict."""

import copy

import pytest
import torch
import torch.nn.functional as F

from dip_scale.diffusion.repa import (
    DINOV2_VITB14_FILE,
    DINOV2_VITB14_URL,
    IMAGENET_MEAN,
    REPA,
    DINOv2ViT,
    alignment_loss,
    load_repa_encoder,
)
from dip_scale.models import build_model

# A small encoder with the real patch size and native grid (14 px patches, 37 x 37 at 518 px).
SMALL = dict(embed_dim=32, depth=2, num_heads=2)


def official_vitb14_shapes() -> dict[str, tuple[int, ...]]:
    """Names and shapes of the tensors in the official dinov2_vitb14_pretrain.pth."""
    E, hidden = 768, 3072
    shapes = {
        "cls_token": (1, 1, E),
        "pos_embed": (1, 1 + 37 * 37, E),
        "mask_token": (1, E),
        "patch_embed.proj.weight": (E, 3, 14, 14),
        "patch_embed.proj.bias": (E,),
        "norm.weight": (E,),
        "norm.bias": (E,),
    }
    for i in range(12):
        b = f"blocks.{i}."
        shapes.update({
            b + "norm1.weight": (E,), b + "norm1.bias": (E,),
            b + "attn.qkv.weight": (3 * E, E), b + "attn.qkv.bias": (3 * E,),
            b + "attn.proj.weight": (E, E), b + "attn.proj.bias": (E,),
            b + "ls1.gamma": (E,),
            b + "norm2.weight": (E,), b + "norm2.bias": (E,),
            b + "mlp.fc1.weight": (hidden, E), b + "mlp.fc1.bias": (hidden,),
            b + "mlp.fc2.weight": (E, hidden), b + "mlp.fc2.bias": (E,),
            b + "ls2.gamma": (E,),
        })
    return shapes


def write_small_encoder(path, dtype=torch.float32) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    state_dict = {k: v.to(dtype) for k, v in DINOv2ViT(**SMALL).state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state_dict, path)
    return state_dict


@pytest.fixture
def small_encoder(tmp_path):
    path = tmp_path / "small.pth"
    write_small_encoder(path)
    return load_repa_encoder(str(path), **SMALL)


def images(batch, height, width, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, height, width, generator=g) * 2 - 1  # in [-1, 1]


# ----------------------------------------------------------------------------------------------------
# The encoder and its loading
# ----------------------------------------------------------------------------------------------------


def test_vitb14_has_the_official_names_shapes_and_size():
    with torch.device("meta"):
        encoder = DINOv2ViT()
    got = {k: tuple(v.shape) for k, v in encoder.state_dict().items()}
    assert got == official_vitb14_shapes()
    # ViT-B/14 as released by DINOv2 (timm's vit_base_patch14_dinov2 reports the same 86.58M).
    assert sum(p.numel() for p in encoder.parameters()) == 86_580_480


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_load_from_path_is_exact_frozen_and_float32(tmp_path, dtype):
    path = tmp_path / "weights" / "small.pth"
    saved = write_small_encoder(path, dtype)
    encoder = load_repa_encoder(str(path), **SMALL)
    loaded = encoder.state_dict()
    assert loaded.keys() == saved.keys()
    for k in saved:
        assert loaded[k].dtype == torch.float32 and loaded[k].device.type == "cpu"
        torch.testing.assert_close(loaded[k], saved[k].float(), rtol=0, atol=0)
    assert not encoder.training
    assert not any(p.requires_grad for p in encoder.parameters())


def test_load_from_the_torch_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    saved = write_small_encoder(tmp_path / "torch_home" / "hub" / "checkpoints" / DINOV2_VITB14_FILE)
    encoder = load_repa_encoder(**SMALL)
    torch.testing.assert_close(encoder.pos_embed, saved["pos_embed"], rtol=0, atol=0)


def test_load_rejects_a_file_with_wrong_names(tmp_path):
    path = tmp_path / "other.pth"
    sd = DINOv2ViT(**SMALL).state_dict()
    sd["blocks.0.attn.qkv.w"] = sd.pop("blocks.0.attn.qkv.weight")
    torch.save(sd, path)
    with pytest.raises(RuntimeError, match="qkv"):
        load_repa_encoder(str(path), **SMALL)


def test_missing_file_says_what_where_and_from_where(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    hub_file = str(tmp_path / "torch_home" / "hub" / "checkpoints" / DINOV2_VITB14_FILE)
    given = str(tmp_path / "nowhere" / "dino.pth")
    with pytest.raises(FileNotFoundError) as info:
        load_repa_encoder(given)
    message = str(info.value)
    for text in (given, hub_file, DINOV2_VITB14_FILE, DINOV2_VITB14_URL, "TORCH_HOME"):
        assert text in message
    with pytest.raises(FileNotFoundError, match=hub_file.replace("\\", "\\\\")):
        load_repa_encoder()


def test_pos_encoding_is_the_identity_at_the_native_grid(small_encoder):
    pos = small_encoder.interpolate_pos_encoding((37, 37))
    assert torch.equal(pos, small_encoder.pos_embed)


def test_pos_encoding_resamples_to_any_grid():
    encoder = DINOv2ViT(**SMALL)
    for grid in [(16, 16), (12, 20), (40, 37)]:
        pos = encoder.interpolate_pos_encoding(grid)
        assert pos.shape == (1, 1 + grid[0] * grid[1], SMALL["embed_dim"])
        assert torch.equal(pos[:, 0], encoder.pos_embed[:, 0])  # the CLS position is never resampled
    # Bicubic weights sum to one, so a constant table stays constant at any grid.
    with torch.no_grad():
        encoder.pos_embed.fill_(0.25)
    torch.testing.assert_close(encoder.interpolate_pos_encoding((12, 20)), torch.full((1, 241, 32), 0.25))


# ----------------------------------------------------------------------------------------------------
# Targets
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size, patch, grid", [((256, 256), 16, (16, 16)), ((192, 320), 16, (12, 20)),
                                                ((512, 512), 32, (16, 16))])
def test_targets_match_the_dit_grid(small_encoder, size, patch, grid):
    seen = []
    small_encoder.patch_embed.register_forward_pre_hook(lambda m, args: seen.append(tuple(args[0].shape)))
    repa = REPA(hidden_size=16, encoder=small_encoder, encoder_dim=SMALL["embed_dim"])
    target = repa.encoder_features(images(2, *size), grid)
    assert seen == [(2, 3, grid[0] * 14, grid[1] * 14)]  # 224 x 224 for a 16 x 16 grid
    assert target.shape == (2, grid[0] * grid[1], SMALL["embed_dim"])
    assert not target.requires_grad


def test_images_are_imagenet_normalised_from_minus_one_one(small_encoder):
    seen = []
    small_encoder.patch_embed.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    repa = REPA(hidden_size=16, encoder=small_encoder, encoder_dim=SMALL["embed_dim"])
    # The image whose [0, 1] value is the ImageNet mean in every channel normalises to zero.
    mean_image = (2 * torch.tensor(IMAGENET_MEAN) - 1).view(1, 3, 1, 1).expand(1, 3, 64, 64)
    repa.encoder_features(mean_image, (4, 4))
    torch.testing.assert_close(seen[0], torch.zeros(1, 3, 56, 56), rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------------------------------
# Loss, gradients, state dict
# ----------------------------------------------------------------------------------------------------


def test_alignment_loss_is_one_minus_cosine():
    target = torch.randn(3, 10, 8)
    assert alignment_loss(target, target).abs() < 1e-6
    assert alignment_loss(5.0 * target, target).abs() < 1e-6  # cosine ignores scale
    torch.testing.assert_close(alignment_loss(-target, target), torch.tensor(2.0))
    assert alignment_loss(torch.randn(3, 10, 8), target) > 0.5


def test_repa_loss_is_weight_times_alignment_of_projected_hidden(small_encoder):
    repa = REPA(hidden_size=16, encoder=small_encoder, encoder_dim=SMALL["embed_dim"], weight=0.5)
    hidden, x = torch.randn(2, 64, 16), images(2, 128, 128)
    target = repa.encoder_features(x, (8, 8))
    loss = repa(hidden.unflatten(1, (8, 8)), x)  # the grid travels with the hidden state
    assert loss.ndim == 0 and loss > 0
    torch.testing.assert_close(loss, 0.5 * alignment_loss(repa.projector(hidden), target))
    with pytest.raises(ValueError, match=r"token grid \(B, h, w, D\)"):
        repa(hidden, x)


def test_gradients_reach_the_projector_and_hidden_not_the_encoder(small_encoder):
    model = build_model("DiP-tiny/16")
    repa = REPA(hidden_size=model.config.hidden_size, encoder=small_encoder, encoder_dim=SMALL["embed_dim"])
    x = images(2, 192, 320)
    t, y = torch.rand(2), torch.tensor([1, 3])
    _, hidden = model.forward_with_hidden(x, t, y, block=1)
    assert hidden.shape == (2, 12, 20, 64)  # the token grid of a 192 x 320 image
    loss = repa(hidden, x)
    loss.backward()
    for p in repa.projector.parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert all(p.grad is None for p in small_encoder.parameters())
    block0 = model.trunk.blocks[0].attn.qkv.weight
    assert block0.grad is not None and block0.grad.abs().sum() > 0  # REPA shapes the DiT trunk


def test_encoder_is_outside_the_module_tree(small_encoder):
    repa = REPA(hidden_size=16, encoder=small_encoder, encoder_dim=SMALL["embed_dim"])
    assert all(k.startswith("projector.") for k in repa.state_dict())
    assert {id(p) for p in repa.parameters()} == {id(p) for p in repa.projector.parameters()}
    repa.train()
    assert repa.projector.training and not small_encoder.training
    assert copy.deepcopy(repa).encoder is small_encoder  # copies (EMA) share the frozen encoder
    # A second REPA restores from the first one's checkpoint alone.
    other = REPA(hidden_size=16, encoder=small_encoder, encoder_dim=SMALL["embed_dim"])
    other.load_state_dict(repa.state_dict(), strict=True)
    x = images(1, 64, 64)
    torch.testing.assert_close(other(torch.ones(1, 4, 4, 16), x), repa(torch.ones(1, 4, 4, 16), x))


def test_encoder_width_must_match(small_encoder):
    with pytest.raises(ValueError, match="encoder_dim"):
        REPA(hidden_size=16, encoder=small_encoder)  # default 768 vs a 32-wide test encoder


def test_encoder_matches_a_direct_vit_computation():
    """The ViT equals the same computation written out with plain tensor ops (one block, non-square)."""
    torch.manual_seed(0)
    enc = DINOv2ViT(embed_dim=16, depth=1, num_heads=2, img_size=28).eval()
    x = torch.randn(1, 3, 28, 42)
    with torch.no_grad():
        for p in enc.parameters():
            p.normal_(0, 0.2)
        tok = F.conv2d(x, enc.patch_embed.proj.weight, enc.patch_embed.proj.bias, stride=14)  # (1, 16, 2, 3)
        tok = torch.cat([enc.cls_token, tok.flatten(2).transpose(1, 2)], 1) + enc.interpolate_pos_encoding((2, 3))
        b = enc.blocks[0]
        q, k, v = F.linear(F.layer_norm(tok, (16,), b.norm1.weight, b.norm1.bias, 1e-6),
                           b.attn.qkv.weight, b.attn.qkv.bias).split(16, -1)
        heads = lambda z: z.view(1, 7, 2, 8).transpose(1, 2)  # noqa: E731
        att = torch.softmax(heads(q) @ heads(k).transpose(-1, -2) / 8 ** 0.5, -1) @ heads(v)
        tok = tok + b.ls1.gamma * b.attn.proj(att.transpose(1, 2).reshape(1, 7, 16))
        tok = tok + b.ls2.gamma * b.mlp.fc2(F.gelu(b.mlp.fc1(F.layer_norm(tok, (16,), b.norm2.weight,
                                                                            b.norm2.bias, 1e-6))))
        expected = F.layer_norm(tok, (16,), enc.norm.weight, enc.norm.bias, 1e-6)[:, 1:]
        torch.testing.assert_close(enc(x), expected)
