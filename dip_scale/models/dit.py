"""The DiT backbone of DiP: a Diffusion Transformer on large pixel patches (docs/dip.md, "The trunk").

Reads top to bottom: patchify helpers -> embedders -> RMSNorm and 2-D RoPE -> attention, SwiGLU ->
block -> trunk. Plain PyTorch for one device; sharding, compilation and checkpointing are applied from
outside (dip_scale.train).

Shapes: B batch, C = 3 channels, P patch size, h x w token grid, N = h * w tokens, D hidden size,
H heads, d = D / H head dim.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# ----------------------------------------------------------------------------------------------------
# Patchify / unpatchify
# ----------------------------------------------------------------------------------------------------


def patchify(x: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, C*P*P), each patch flattened channel-major (c, row, col) like F.unfold,
    tokens in row-major patch order."""
    B, C, H, W = x.shape
    P = patch_size
    h, w = H // P, W // P
    x = x.reshape(B, C, h, P, w, P)  # (B, C, h, P, w, P)
    x = x.permute(0, 2, 4, 1, 3, 5)  # (B, h, w, C, P, P)
    return x.reshape(B, h * w, C * P * P)  # (B, N, C*P*P)


def unpatchify(tokens: torch.Tensor, patch_size: int, grid: tuple[int, int], channels: int = 3) -> torch.Tensor:
    """Inverse of patchify: (B, N, C*P*P) -> (B, C, h*P, w*P)."""
    B = tokens.shape[0]
    h, w = grid
    P = patch_size
    x = tokens.reshape(B, h, w, channels, P, P)  # (B, h, w, C, P, P)
    x = x.permute(0, 3, 1, 4, 2, 5)  # (B, C, h, P, w, P)
    return x.reshape(B, channels, h * P, w * P)  # (B, C, H, W)


# ----------------------------------------------------------------------------------------------------
# Embedders
# ----------------------------------------------------------------------------------------------------


class PatchEmbedder(nn.Module):
    """Linear(3*P*P -> D) on flattened patches. No absolute position embedding (RoPE does positions)."""

    def __init__(self, patch_size: int, hidden_size: int, in_channels: int = 3):
        super().__init__()
        self.proj = nn.Linear(in_channels * patch_size * patch_size, hidden_size, bias=True)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return self.proj(patches)  # (B, N, D)


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of t in [0, 1] with max_period 10, cos first, then an MLP."""

    def __init__(self, hidden_size: int, frequency_dim: int = 256, max_period: float = 10.0):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.max_period = max_period
        self.mlp = nn.Sequential(
            nn.Linear(frequency_dim, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )

    def timestep_features(self, t: torch.Tensor) -> torch.Tensor:
        half = self.frequency_dim // 2
        # freqs_i = exp(-ln(max_period) * i / half), i = 0..half-1; t is in [0, 1], not [0, 1000].
        freqs = torch.exp(-math.log(self.max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.float()[:, None] * freqs[None]  # (B, half)
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, 256)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        features = self.timestep_features(t).to(self.mlp[0].weight.dtype)
        return self.mlp(features)  # (B, D)


class LabelEmbedder(nn.Module):
    """Embedding(num_classes + 1, D); id `num_classes` is the null class used for guidance."""

    def __init__(self, num_classes: int, hidden_size: int):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(y)  # (B, D)


# ----------------------------------------------------------------------------------------------------
# Normalisation and rotary position embedding
# ----------------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """Normalise in float32, cast back to the input dtype, then scale by the learned weight."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def rope_angles(grid: tuple[int, int], head_dim: int, theta: float = 10000.0, device=None) -> torch.Tensor:
    """Rotation angles (N, head_dim/2) of the 2-D RoPE for an h x w token grid.

    Positions are scaled to [0, 16] along each axis whatever the grid size; complex pair m of a head vector
    turns by x * f_{m/2} for even m and y * f_{(m-1)/2} for odd m, f_j = theta^(-4j/d)."""
    h, w = grid
    exponents = torch.arange(0, head_dim, 4, dtype=torch.float32, device=device)[: head_dim // 4] / head_dim
    freqs = 1.0 / theta ** exponents
    xs = torch.linspace(0, 16, w, dtype=torch.float32, device=device)
    ys = torch.linspace(0, 16, h, dtype=torch.float32, device=device)
    col = xs.repeat(h)  # (N,) token k sits at column k % w
    row = ys.repeat_interleave(w)  # (N,) and row k // w
    ang_x = col[:, None] * freqs[None]  # (N, d/4)
    ang_y = row[:, None] * freqs[None]  # (N, d/4)
    return torch.stack([ang_x, ang_y], dim=-1).reshape(h * w, head_dim // 2)  # (N, d/2), x and y interleaved


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (x[2m], x[2m+1]) as complex numbers; real arithmetic in float32.

    x: (B, H, N, d); cos, sin: (N, d/2)."""
    x32 = x.float().unflatten(-1, (-1, 2))  # (B, H, N, d/2, 2)
    re, im = x32[..., 0], x32[..., 1]
    out = torch.stack([re * cos - im * sin, re * sin + im * cos], dim=-1)  # (B, H, N, d/2, 2)
    return out.flatten(-2).type_as(x)  # (B, H, N, d)


# ----------------------------------------------------------------------------------------------------
# Attention and feed-forward
# ----------------------------------------------------------------------------------------------------


class Attention(nn.Module):
    """Multi-head self-attention with per-head RMSNorm on q and k, then 2-D RoPE."""

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size, bias=False)
        self.q_norm = RMSNorm(self.head_dim)
        self.k_norm = RMSNorm(self.head_dim)
        self.proj = nn.Linear(hidden_size, hidden_size, bias=True)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim)  # (B, N, 3, H, d)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, N, d)
        q = apply_rope(self.q_norm(q), *rope)
        k = apply_rope(self.k_norm(k), *rope)
        x = F.scaled_dot_product_attention(q, k, v)  # (B, H, N, d)
        x = x.transpose(1, 2).reshape(B, N, D)  # (B, N, D)
        return self.proj(x)


class SwiGLU(nn.Module):
    """w2(SiLU(w1 x) * w3 x), no biases."""

    def __init__(self, hidden_size: int, ffn_hidden: int):
        super().__init__()
        self.w1 = nn.Linear(hidden_size, ffn_hidden, bias=False)
        self.w3 = nn.Linear(hidden_size, ffn_hidden, bias=False)
        self.w2 = nn.Linear(ffn_hidden, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def ffn_hidden_size(hidden_size: int, mlp_ratio: float = 4.0) -> int:
    return int(2 * mlp_ratio * hidden_size / 3)  # 3072 at D = 1152


# ----------------------------------------------------------------------------------------------------
# Transformer block
# ----------------------------------------------------------------------------------------------------


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class DiTBlock(nn.Module):
    """Pre-norm block with adaLN modulation from the condition c (which already went through SiLU)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = RMSNorm(hidden_size)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = RMSNorm(hidden_size)
        self.mlp = SwiGLU(hidden_size, ffn_hidden_size(hidden_size, mlp_ratio))
        self.adaLN_modulation = nn.Linear(hidden_size, 6 * hidden_size, bias=True)

    def forward(self, x: torch.Tensor, c: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        # c: (B, 1, D) -> six (B, 1, D) tensors, in the released order.
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + gate_msa * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), rope)  # (B, N, D)
        x = x + gate_mlp * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))  # (B, N, D)
        return x


# ----------------------------------------------------------------------------------------------------
# The trunk
# ----------------------------------------------------------------------------------------------------


class DiTTrunk(nn.Module):
    """The trunk's parts: embedders, RoPE and `depth` DiT blocks. No final norm: the head decides what to read.

    DiP runs the blocks itself (models/dip.py), because what sits between them depends on the model: the
    mid-network head placement adds its output after the middle block, and REPA reads the hidden state
    after block 8."""

    def __init__(self, patch_size: int, hidden_size: int, depth: int, num_heads: int, num_classes: int,
                 mlp_ratio: float = 4.0, rope_theta: float = 10000.0):
        super().__init__()
        self.patch_size = patch_size
        self.num_heads = num_heads
        self.rope_theta = rope_theta
        self.s_embedder = PatchEmbedder(patch_size, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size)
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])

    def rope(self, grid: tuple[int, int], device) -> tuple[torch.Tensor, torch.Tensor]:
        angles = rope_angles(grid, self.blocks[0].attn.head_dim, self.rope_theta, device=device)
        return angles.cos(), angles.sin()  # (N, d/2) each

    def embed(self, patches: torch.Tensor, t: torch.Tensor, y: torch.Tensor):
        """Tokens h (B, N, D) of the patches, the condition c (B, 1, D) every block reads and the timestep
        embedding t_emb (B, D) the heads read."""
        h = self.s_embedder(patches)  # (B, N, D)
        t_emb = self.t_embedder(t)  # (B, D)
        c = F.silu(t_emb + self.y_embedder(y)).unsqueeze(1)  # (B, 1, D)
        return h, c, t_emb
