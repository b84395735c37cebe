"""Patch Detailer Heads: small networks that run on every patch independently (batch B*N) and turn the
DiT token of a patch plus the raw noisy pixels of that patch into the patch's velocity.

- PatchDetailerUNet: the paper's head (DIP_SPEC.md section 1), a conv U-Net whose bottleneck takes the
  DiT token. Its module names equal the released checkpoint's `local_decoder.*` names.
- MLPDetailer, AttentionDetailer: the ablation heads of the paper's Table (plain MLP; attention among
  the pixels of one patch).

Every head: forward(patches (B, N, C*P*P), s (B, N, D)) -> (B, N, C*P*P), patches flattened as
dip_scale.models.dit.patchify does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


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
        # `channels_last_weights` converts them where the parameters are not sharded. Same function.
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


def channels_last_weights(net: nn.Module) -> nn.Module:
    """Put the conv head's weights in channels-last order (in place; returns `net`). With NHWC weights too,
    cuDNN runs the whole U-Net without layout transposes: on an H200 the eager DiP-XL/16 training step went
    from 173 to 185 img/s (docs/perf_log.md). Only for unsharded parameters (ddp, sampling): FSDP2 refuses
    non-contiguous parameters, and DeepSpeed flattens them. load_state_dict keeps the layout."""
    for module in net.modules():
        if isinstance(module, PatchDetailerUNet):
            module.to(memory_format=torch.channels_last)
    return net


class MLPDetailer(nn.Module):
    """Ablation: an MLP on [raw patch pixels, DiT token] of each patch."""

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
    """Ablation: self-attention among the P*P pixels of one patch, conditioned on the DiT token."""

    def __init__(self, patch_size: int, hidden_size: int, in_channels: int = 3, width: int = 64,
                 depth: int = 2, num_heads: int = 4):
        super().__init__()
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


DETAILER_HEADS = {"unet": PatchDetailerUNet, "mlp": MLPDetailer, "attention": AttentionDetailer}
