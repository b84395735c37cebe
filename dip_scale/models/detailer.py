"""Patch Detailer Heads: small networks that run on every patch independently (batch B*N) and turn the
DiT token of a patch plus the raw noisy pixels of that patch into the patch's velocity (docs/dip.md).

- PatchDetailerUNet: the paper's head, a conv U-Net whose bottleneck takes the DiT token. Its module
  names equal the released checkpoint's `local_decoder.*` names.
- MLPDetailer, AttentionDetailer, CoordMLPDetailer: the other designs of the paper's ablation of head
  designs (a plain MLP on the patch; attention among the pixels of one patch; a coordinate-based MLP that
  predicts each pixel from its position in the patch).

Every head: forward(patches (B, N, C*P*P), s (B, N, D)) -> (B, N, C*P*P), patches flattened as
dip_scale.models.dit.patchify does. A head reads only its own patch and that patch's token, so a patch's
output depends on the rest of the image only through the trunk.

One knob sizes every head, `width` of make_head (DiPConfig.detailer_width): the U-Net's base width (64 in
the paper), and for the ablation heads a hidden width scaled from it. At width 64 on DiP-XL/16 the U-Net has
6.97M parameters and costs 34 GFLOPs an image; the MLP about half its parameters (3.8M, 2 GFLOPs), the
attention and coordinate-MLP heads about half its compute (22 and 18 GFLOPs, 0.19M and 0.43M parameters,
their weights shared by every pixel). docs/dip.md has the table.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# ----------------------------------------------------------------------------------------------------
# The paper's head: a conv U-Net per patch
# ----------------------------------------------------------------------------------------------------


def _conv_silu(in_ch: int, out_ch: int, kernel: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, kernel, padding=kernel // 2, bias=True), nn.SiLU())


class PatchDetailerUNet(nn.Module):
    """Conv U-Net over one P x P patch; four 2x poolings, so the bottleneck is (P/16) x (P/16).
    Widths are base_width x (1, 2, 4, 8): 64..512 in the paper."""

    def __init__(self, patch_size: int, hidden_size: int, in_channels: int = 3, base_width: int = 64):
        super().__init__()
        if patch_size % 16:
            raise ValueError(f"the conv detailer head needs a patch size divisible by 16, got {patch_size}")
        self.patch_size = patch_size
        self.in_channels = in_channels
        w1, w2, w3, w4 = (base_width * m for m in (1, 2, 4, 8))
        self.enc1 = _conv_silu(in_channels, w1, 3)
        self.enc2 = _conv_silu(w1, w2, 3)
        self.enc3 = _conv_silu(w2, w3, 3)
        self.enc4 = _conv_silu(w3, w4, 3)
        self.bottleneck = _conv_silu(w4 + hidden_size, w4, 1)  # the only place the DiT token enters
        self.up4 = nn.ConvTranspose2d(w4, w4, kernel_size=2, stride=2)
        self.dec4 = _conv_silu(w4 + w4, w3, 3)
        self.up3 = nn.ConvTranspose2d(w3, w3, kernel_size=2, stride=2)
        self.dec3 = _conv_silu(w3 + w3, w2, 3)
        self.up2 = nn.ConvTranspose2d(w2, w2, kernel_size=2, stride=2)
        self.dec2 = _conv_silu(w2 + w2, w1, 3)
        self.up1 = nn.ConvTranspose2d(w1, w1, kernel_size=2, stride=2)
        self.dec1 = _conv_silu(w1 + w1, w1, 3)
        self.out_conv = nn.Conv2d(w1, in_channels, kernel_size=1, bias=True)

    def forward(self, patches: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        B, N, _ = patches.shape
        P, C, D = self.patch_size, self.in_channels, s.shape[-1]
        # Channels-last (NHWC) activations: cuDNN's tensor-core convolutions work in NHWC, and NCHW tensors
        # make it transpose activations in and out of each conv (docs/perf_log.md). Convolutions keep their
        # input's layout. The weights are NCHW by default (FSDP2 shards only contiguous parameters);
        # dip_scale.models.channels_last_weights converts them where the parameters are not sharded.
        x = patches.reshape(B * N, C, P, P).contiguous(memory_format=torch.channels_last)  # (BN, 3, P, P)
        b = P // 16
        token = s.reshape(B * N, D, 1, 1).expand(B * N, D, b, b)  # (BN, D, P/16, P/16)
        token = token.contiguous(memory_format=torch.channels_last)  # a no-op at P = 16 (1 x 1)

        e1 = self.enc1(x)  # (BN, 64, P, P)
        e2 = self.enc2(F.max_pool2d(e1, 2))  # (BN, 128, P/2, P/2)
        e3 = self.enc3(F.max_pool2d(e2, 2))  # (BN, 256, P/4, P/4)
        e4 = self.enc4(F.max_pool2d(e3, 2))  # (BN, 512, P/8, P/8)
        z = self.bottleneck(torch.cat([F.max_pool2d(e4, 2), token.to(e4.dtype)], dim=1))  # (BN, 512, P/16, P/16)

        z = self.dec4(torch.cat([self.up4(z), e4], dim=1))  # (BN, 256, P/8, P/8)
        z = self.dec3(torch.cat([self.up3(z), e3], dim=1))  # (BN, 128, P/4, P/4)
        z = self.dec2(torch.cat([self.up2(z), e2], dim=1))  # (BN, 64, P/2, P/2)
        z = self.dec1(torch.cat([self.up1(z), e1], dim=1))  # (BN, 64, P, P)
        out = self.out_conv(z)  # (BN, 3, P, P)
        return out.reshape(B, N, C * P * P)


# ----------------------------------------------------------------------------------------------------
# Ablation heads
# ----------------------------------------------------------------------------------------------------


class MLPDetailer(nn.Module):
    """A plain MLP on [raw patch pixels, DiT token] of each patch: Linear, SiLU, Linear, SiLU, Linear."""

    def __init__(self, patch_size: int, hidden_size: int, in_channels: int = 3, width: int = 1024):
        super().__init__()
        patch_dim = in_channels * patch_size * patch_size
        self.net = nn.Sequential(
            nn.Linear(patch_dim + hidden_size, width), nn.SiLU(),
            nn.Linear(width, width), nn.SiLU(),
            nn.Linear(width, patch_dim),
        )

    def forward(self, patches: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([patches, s.to(patches.dtype)], dim=-1))  # (B, N, C*P*P)


class _PixelBlock(nn.Module):
    """Pre-norm transformer block over the pixels of one patch (LayerNorm, attention, GELU MLP)."""

    def __init__(self, width: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        M, L, W = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(M, L, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(M, L, W)  # (M, L, W)
        x = x + self.proj(a)
        return x + self.mlp(self.norm2(x))


class AttentionDetailer(nn.Module):
    """Self-attention among the P*P pixels of one patch: each pixel's RGB, a learned position embedding and
    the patch's DiT token are embedded and summed, then `depth` transformer blocks, then a linear read-out.
    Attention heads of 16 channels (4 at width 64), or one head when the width is not a multiple of 16."""

    def __init__(self, patch_size: int, hidden_size: int, in_channels: int = 3, width: int = 64,
                 depth: int = 2):
        super().__init__()
        num_heads = width // 16 if width % 16 == 0 else 1
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.pixel_in = nn.Linear(in_channels, width)
        self.token_in = nn.Linear(hidden_size, width)
        self.pos = nn.Parameter(torch.zeros(patch_size * patch_size, width))
        nn.init.normal_(self.pos, std=0.02)
        self.blocks = nn.ModuleList([_PixelBlock(width, num_heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(width)
        self.pixel_out = nn.Linear(width, in_channels)

    def forward(self, patches: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        B, N, _ = patches.shape
        C, L = self.in_channels, self.patch_size * self.patch_size
        pixels = patches.reshape(B * N, C, L).transpose(1, 2)  # (BN, L, C), row-major pixels
        x = self.pixel_in(pixels) + self.pos + self.token_in(s.reshape(B * N, 1, -1).to(pixels.dtype))  # (BN, L, W)
        for block in self.blocks:
            x = block(x)
        out = self.pixel_out(self.norm(x))  # (BN, L, C)
        return out.transpose(1, 2).reshape(B, N, C * L)


def coordinate_features(patch_size: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Position of every pixel inside a P x P patch, (P*P, 2 + 4K) in row-major pixel order.

    Pixel centres u (column) and v (row) in (-1, 1), then sin and cos of 2^k pi u and 2^k pi v for
    k = 0..K-1, K = ceil(log2 P): the highest octave has a 2-pixel period, the patch's Nyquist frequency.
    A plain MLP on (u, v) alone only fits smooth functions of position (spectral bias)."""
    P = patch_size
    centres = (torch.arange(P, device=device, dtype=torch.float32) + 0.5) * (2.0 / P) - 1.0  # (P,)
    v, u = torch.meshgrid(centres, centres, indexing="ij")  # (P, P) each: row, column
    uv = torch.stack([u.reshape(-1), v.reshape(-1)], dim=-1)  # (P*P, 2)
    octaves = max(1, math.ceil(math.log2(P)))
    freqs = math.pi * 2.0 ** torch.arange(octaves, device=device, dtype=torch.float32)  # (K,)
    angles = (uv[:, :, None] * freqs).reshape(P * P, 2 * octaves)  # (P*P, 2K): u octaves, then v octaves
    return torch.cat([uv, angles.sin(), angles.cos()], dim=-1).to(dtype)  # (P*P, 2 + 4K)


class CoordMLPDetailer(nn.Module):
    """A coordinate-based MLP (a neural field over the patch): the same MLP predicts every pixel's velocity
    from [the patch's DiT token, Fourier features of the pixel's position in the patch, the pixel's own
    noisy RGB]. The first layer, a Linear on that concatenation, is computed as the sum of one Linear per
    part (the same function), so the token's part runs once per patch instead of once per pixel. Then
    SiLU and `depth - 1` hidden Linear + SiLU layers, and Linear(width -> 3)."""

    def __init__(self, patch_size: int, hidden_size: int, in_channels: int = 3, width: int = 256, depth: int = 3):
        super().__init__()
        self.patch_size = patch_size
        self.in_channels = in_channels
        coord_dim = coordinate_features(patch_size, device="meta").shape[-1]
        self.token_in = nn.Linear(hidden_size, width)  # carries the first layer's bias
        self.coord_in = nn.Linear(coord_dim, width, bias=False)
        self.pixel_in = nn.Linear(in_channels, width, bias=False)
        self.hidden = nn.ModuleList([nn.Linear(width, width) for _ in range(depth - 1)])
        self.out = nn.Linear(width, in_channels)

    def forward(self, patches: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        B, N, _ = patches.shape
        C, L = self.in_channels, self.patch_size * self.patch_size
        pixels = patches.reshape(B, N, C, L).transpose(2, 3)  # (B, N, L, C), row-major pixels
        coords = coordinate_features(self.patch_size, patches.device, patches.dtype)  # (L, 2 + 4K)
        token = self.token_in(s.to(patches.dtype)).unsqueeze(2)  # (B, N, 1, W), once per patch
        z = F.silu(self.pixel_in(pixels) + self.coord_in(coords) + token)  # (B, N, L, W)
        for layer in self.hidden:
            z = F.silu(layer(z))  # (B, N, L, W)
        out = self.out(z)  # (B, N, L, C)
        return out.transpose(2, 3).reshape(B, N, C * L)


# ----------------------------------------------------------------------------------------------------
# Building a head by name
# ----------------------------------------------------------------------------------------------------


def make_head(kind: str, patch_size: int, hidden_size: int, width: int) -> nn.Module:
    """The head `kind` for P x P patches and D-wide tokens, sized by `width` (DiPConfig.detailer_width):
    unet base width = width (64..512 at 64); mlp hidden = 16 x width (1024 at 64); attention width = width,
    2 blocks, heads of 16 channels; coord_mlp hidden = 4 x width (256 at 64), 3 layers."""
    if kind == "unet":
        return PatchDetailerUNet(patch_size, hidden_size, base_width=width)
    if kind == "mlp":
        return MLPDetailer(patch_size, hidden_size, width=16 * width)
    if kind == "attention":
        return AttentionDetailer(patch_size, hidden_size, width=width)
    if kind == "coord_mlp":
        return CoordMLPDetailer(patch_size, hidden_size, width=4 * width)
    raise ValueError(f"unknown detailer head {kind!r}; expected one of {HEADS}")


HEADS = ("unet", "mlp", "attention", "coord_mlp")

__all__ = ["PatchDetailerUNet", "MLPDetailer", "AttentionDetailer", "CoordMLPDetailer", "HEADS", "make_head",
           "coordinate_features"]
