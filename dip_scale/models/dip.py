"""DiP: the DiT trunk plus a Patch Detailer Head, assembled; its config, presets and build_model.

    model = build_model("DiP-XL/16")
    v = model(x, t, y)   # x (B, 3, H, W) in [-1, 1]; t (B,) in [0, 1], 0 = noise; y (B,) int, num_classes = null

H and W may be any multiples of the patch size (non-square too). With detailer_head="none" the model is
the DiT-only baseline: the standard DiT final layer (LayerNorm, adaLN shift/scale, Linear) on the last
hidden state.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dip_scale.models.detailer import DETAILER_HEADS, AttentionDetailer, MLPDetailer, PatchDetailerUNet
from dip_scale.models.dit import DiTTrunk, modulate, patchify, unpatchify

HEAD_KINDS = ("unet", "mlp", "attention", "none")


@dataclass
class DiPConfig:
    """Architecture of a DiP model. Field names equal the constructor arguments they feed."""

    depth: int = 26
    """Number of DiT blocks."""
    hidden_size: int = 1152
    """Token width D."""
    num_heads: int = 16
    """Attention heads; hidden_size / num_heads is the head dim (72 for XL)."""
    patch_size: int = 16
    """Side P of the square pixel patches; 16 at 256 px, 32 at 512 px."""
    num_classes: int = 1000
    """Number of classes; id num_classes is the null class for classifier-free guidance."""
    detailer_head: str = "unet"
    """Head kind: unet (the paper's Patch Detailer Head), mlp, attention (ablations) or none (DiT-only)."""
    detailer_width: int = 64
    """Base width of the conv head (64 in the paper: 64, 128, 256, 512); smaller for tiny test models."""
    mlp_ratio: float = 4.0
    """SwiGLU hidden size is int(2 * mlp_ratio * D / 3)."""
    rope_theta: float = 10000.0
    """Base of the 2-D rotary position embedding."""

    def __post_init__(self):
        if self.detailer_head not in HEAD_KINDS:
            raise ValueError(f"detailer_head must be one of {HEAD_KINDS}, got {self.detailer_head!r}")
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 4:
            raise ValueError(f"hidden_size {self.hidden_size} / num_heads {self.num_heads} must give a head dim "
                             "divisible by 4 (2-D RoPE)")
        if self.detailer_head == "unet" and self.patch_size % 16:
            raise ValueError(f"detailer_head 'unet' needs patch_size divisible by 16, got {self.patch_size}")
        for name in ("depth", "hidden_size", "num_heads", "patch_size", "num_classes", "detailer_width"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


# ----------------------------------------------------------------------------------------------------
# DiT-only final layer (the baseline the paper ablates against)
# ----------------------------------------------------------------------------------------------------


class FinalLayer(nn.Module):
    """Standard DiT output layer: LayerNorm (no affine), adaLN shift/scale from c, Linear(D -> C*P*P)."""

    def __init__(self, hidden_size: int, patch_size: int, in_channels: int = 3):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.adaLN_modulation = nn.Linear(hidden_size, 2 * hidden_size, bias=True)
        self.linear = nn.Linear(hidden_size, in_channels * patch_size * patch_size, bias=True)

    def forward(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)  # (B, 1, D) each
        return self.linear(modulate(self.norm_final(h), shift, scale))  # (B, N, C*P*P)


# ----------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------


class DiP(nn.Module):
    def __init__(self, config: DiPConfig):
        super().__init__()
        self.config = config
        c = config
        self.trunk = DiTTrunk(c.patch_size, c.hidden_size, c.depth, c.num_heads, c.num_classes,
                              c.mlp_ratio, c.rope_theta)
        if c.detailer_head == "none":
            self.final_layer = FinalLayer(c.hidden_size, c.patch_size)
            self.detailer = None
        elif c.detailer_head == "unet":
            self.detailer = PatchDetailerUNet(c.patch_size, c.hidden_size, base_width=c.detailer_width)
        elif c.detailer_head == "mlp":
            self.detailer = MLPDetailer(c.patch_size, c.hidden_size)
        else:
            self.detailer = AttentionDetailer(c.patch_size, c.hidden_size)
        self.initialize_weights()

    def initialize_weights(self):
        """PyTorch defaults everywhere except the embedders (DIP_SPEC.md section 1)."""
        proj = self.trunk.s_embedder.proj
        nn.init.xavier_uniform_(proj.weight)
        nn.init.zeros_(proj.bias)
        nn.init.normal_(self.trunk.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.trunk.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.trunk.t_embedder.mlp[2].weight, std=0.02)

    def check_inputs(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor):
        P = self.config.patch_size
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"x must be (B, 3, H, W) pixels in [-1, 1], got shape {tuple(x.shape)}")
        if x.shape[2] % P or x.shape[3] % P:
            raise ValueError(f"image size {x.shape[2]}x{x.shape[3]} is not divisible by the patch size {P}; "
                             f"use a height and width that are multiples of {P}")
        if t.shape != (x.shape[0],) or y.shape != (x.shape[0],):
            raise ValueError(f"t and y must have shape ({x.shape[0]},), got {tuple(t.shape)} and {tuple(y.shape)}")
        # A range check needs the values; only done where it costs no device sync.
        if y.device.type == "cpu" and y.numel() and (int(y.min()) < 0 or int(y.max()) > self.config.num_classes):
            raise ValueError(f"class ids must be in [0, {self.config.num_classes}] ({self.config.num_classes} = "
                             f"no class), got values in [{int(y.min())}, {int(y.max())}]")

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, feature_block: int | None = None):
        """Velocity v (B, 3, H, W); with feature_block=k also the hidden state after block k (B, N, D)."""
        self.check_inputs(x, t, y)
        P = self.config.patch_size
        grid = (x.shape[2] // P, x.shape[3] // P)
        patches = patchify(x, P)  # (B, N, 3*P*P)
        h, c, t_emb, features = self.trunk(patches, grid, t, y, feature_block)  # (B, N, D)
        if self.detailer is None:
            out = self.final_layer(h, c)  # (B, N, 3*P*P)
        else:
            s = F.silu(t_emb.unsqueeze(1) + h)  # (B, N, D), the per-patch token the head reads
            out = self.detailer(patches, s)  # (B, N, 3*P*P)
        v = unpatchify(out, P, grid)  # (B, 3, H, W)
        return v if feature_block is None else (v, features)


# ----------------------------------------------------------------------------------------------------
# Presets
# ----------------------------------------------------------------------------------------------------

_SIZES = {
    "XL": dict(depth=26, hidden_size=1152, num_heads=16),
    "L": dict(depth=22, hidden_size=1024, num_heads=16),
    "B": dict(depth=12, hidden_size=768, num_heads=12),
    "S": dict(depth=12, hidden_size=384, num_heads=6),
}

PRESETS: dict[str, DiPConfig] = {}
for _size, _arch in _SIZES.items():
    for _p in (16, 32):
        PRESETS[f"DiP-{_size}/{_p}"] = DiPConfig(**_arch, patch_size=_p, detailer_head="unet")
        PRESETS[f"DiT-{_size}/{_p}"] = DiPConfig(**_arch, patch_size=_p, detailer_head="none")
# Debug flavours: train on a CPU in seconds (10 classes, small trunk, narrow head).
PRESETS["DiP-tiny/16"] = DiPConfig(depth=2, hidden_size=64, num_heads=2, patch_size=16, num_classes=10,
                                   detailer_width=8)
PRESETS["DiT-tiny/16"] = dataclasses.replace(PRESETS["DiP-tiny/16"], detailer_head="none")


def build_model(preset_or_config: str | DiPConfig, **overrides) -> DiP:
    """Build a DiP from a preset name (see PRESETS) or a DiPConfig; keyword overrides replace fields."""
    if isinstance(preset_or_config, str):
        if preset_or_config not in PRESETS:
            raise ValueError(f"unknown model preset {preset_or_config!r}; expected one of {sorted(PRESETS)}")
        config = PRESETS[preset_or_config]
    elif isinstance(preset_or_config, DiPConfig):
        config = preset_or_config
    else:
        raise TypeError(f"build_model takes a preset name or a DiPConfig, got {type(preset_or_config).__name__}")
    if overrides:
        known = {f.name for f in dataclasses.fields(DiPConfig)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"unknown DiPConfig field(s) {unknown}; expected some of {sorted(known)}")
        config = dataclasses.replace(config, **overrides)
    return DiP(config)


__all__ = ["DiP", "DiPConfig", "FinalLayer", "PRESETS", "HEAD_KINDS", "build_model", "DETAILER_HEADS"]
