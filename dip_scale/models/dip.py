"""DiP: the DiT trunk plus a Patch Detailer Head, assembled; its config, presets and build_model.

    model = build_model("DiP-XL/16")
    v = model(x, t, y)   # x (B, 3, H, W) in [-1, 1]; t (B,) in [0, 1], 0 = noise; y (B,) int, num_classes = null
    v, hidden = model.forward_with_hidden(x, t, y, block=8)   # hidden (B, H/P, W/P, D), for REPA

H and W may be any multiples of the patch size (non-square too). With detailer_head="none" the model is
the DiT-only baseline: the standard DiT final layer (LayerNorm, adaLN shift/scale, Linear) on the last
hidden state. head_placement chooses where the head sits (the paper's ablation of placements, docs/dip.md):
"end" reads the last hidden state and outputs the velocity (the paper's choice); "mid" runs the head after
the middle block and adds its output, re-embedded to a token, back into the trunk, which then ends in the
DiT final layer; "both" does the two with two heads.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dip_scale.models.detailer import HEADS, make_head
from dip_scale.models.dit import DiTTrunk, modulate, patchify, unpatchify

HEAD_KINDS = (*HEADS, "none")
HEAD_PLACEMENTS = ("end", "mid", "both")


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
    """Head kind: unet (the paper's Patch Detailer Head), mlp, attention, coord_mlp (the paper's ablation
    heads) or none (DiT-only)."""
    detailer_width: int = 64
    """Size of the head: the conv head's base width (64 in the paper: 64, 128, 256, 512); the ablation heads
    scale their widths from it (models/detailer.py make_head). Smaller for tiny test models."""
    head_placement: str = "end"
    """Where the head sits: end (after the last block, the paper's choice), mid (after block depth // 2, its
    output fed back into the trunk) or both (docs/dip.md)."""
    mlp_ratio: float = 4.0
    """SwiGLU hidden size is int(2 * mlp_ratio * D / 3)."""
    rope_theta: float = 10000.0
    """Base of the 2-D rotary position embedding."""

    def __post_init__(self):
        if self.detailer_head not in HEAD_KINDS:
            raise ValueError(f"detailer_head must be one of {HEAD_KINDS}, got {self.detailer_head!r}")
        if self.head_placement not in HEAD_PLACEMENTS:
            raise ValueError(f"head_placement must be one of {HEAD_PLACEMENTS}, got {self.head_placement!r}")
        if self.detailer_head == "none" and self.head_placement != "end":
            raise ValueError(f"head_placement {self.head_placement!r} needs a head; detailer_head is 'none'")
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 4:
            raise ValueError(f"hidden_size {self.hidden_size} / num_heads {self.num_heads} must give a head dim "
                             "divisible by 4 (2-D RoPE)")
        if self.detailer_head == "unet" and self.patch_size % 16:
            raise ValueError(f"detailer_head 'unet' needs patch_size divisible by 16, got {self.patch_size}")
        for name in ("depth", "hidden_size", "num_heads", "patch_size", "num_classes", "detailer_width"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.head_placement != "end" and self.depth < 2:
            raise ValueError(f"head_placement {self.head_placement!r} needs depth >= 2 (a block on each side "
                             f"of the head), got {self.depth}")

    @property
    def mid_block(self) -> int | None:
        """The block after which the mid-network head runs (None without one)."""
        return self.depth // 2 if self.head_placement in ("mid", "both") else None


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


def head_token(h: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
    """The per-patch token a head reads: SiLU(t_emb + h), (B, N, D) (the released design)."""
    return F.silu(t_emb.unsqueeze(1) + h)


class DiP(nn.Module):
    """Submodules: `trunk`; `detailer` (the head after the last block) or `final_layer` (the DiT output
    layer, when no head sits at the end); with a mid-network head, `mid_detailer` and `mid_feedback`.
    Absent ones are None."""

    def __init__(self, config: DiPConfig):
        super().__init__()
        self.config = c = config
        self.trunk = DiTTrunk(c.patch_size, c.hidden_size, c.depth, c.num_heads, c.num_classes,
                              c.mlp_ratio, c.rope_theta)
        head_at_end = c.detailer_head != "none" and c.head_placement in ("end", "both")
        self.final_layer = None if head_at_end else FinalLayer(c.hidden_size, c.patch_size)
        self.detailer = None
        if head_at_end:
            self.detailer = make_head(c.detailer_head, c.patch_size, c.hidden_size, c.detailer_width)
        self.mid_detailer = self.mid_feedback = None
        if c.mid_block is not None:
            self.mid_detailer = make_head(c.detailer_head, c.patch_size, c.hidden_size, c.detailer_width)
            self.mid_feedback = nn.Linear(3 * c.patch_size * c.patch_size, c.hidden_size)  # patch -> token
        self.initialize_weights()

    def initialize_weights(self):
        """PyTorch defaults everywhere except the embedders, as released (docs/dip.md); the ablation heads and
        the mid head's feedback follow the same rule."""
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

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Velocity v (B, 3, H, W)."""
        return self._run(x, t, y, hidden_block=None)[0]

    def forward_with_hidden(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                            block: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Velocity v (B, 3, H, W) and the hidden state after `block` blocks as a token grid (B, H/P, W/P, D),
        tokens in patch order (with a mid-network head at that block, after its feedback is added)."""
        if not 1 <= block <= self.config.depth:
            raise ValueError(f"block must be within the model's {self.config.depth} blocks, got {block}")
        return self._run(x, t, y, hidden_block=block)

    def _run(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, hidden_block: int | None):
        self.check_inputs(x, t, y)
        P = self.config.patch_size
        grid = (x.shape[2] // P, x.shape[3] // P)
        patches = patchify(x, P)  # (B, N, 3*P*P)
        h, c, t_emb = self.trunk.embed(patches, t, y)  # (B, N, D), (B, 1, D), (B, D)
        rope = self.trunk.rope(grid, x.device)
        hidden = None
        for i, block in enumerate(self.trunk.blocks, start=1):
            h = block(h, c, rope)  # (B, N, D)
            if i == self.config.mid_block:
                detail = self.mid_detailer(patches, head_token(h, t_emb))  # (B, N, 3*P*P)
                h = h + self.mid_feedback(detail)  # (B, N, D)
            if i == hidden_block:
                hidden = h.unflatten(1, grid)  # (B, h, w, D)
        if self.detailer is None:
            out = self.final_layer(h, c)  # (B, N, 3*P*P)
        else:
            out = self.detailer(patches, head_token(h, t_emb))  # (B, N, 3*P*P)
        return unpatchify(out, P, grid), hidden  # (B, 3, H, W)


# ----------------------------------------------------------------------------------------------------
# Presets
# ----------------------------------------------------------------------------------------------------

_SIZES = {
    "XL": dict(depth=26, hidden_size=1152, num_heads=16),
    "L": dict(depth=22, hidden_size=1024, num_heads=16),
    "B": dict(depth=12, hidden_size=768, num_heads=12),
    "S": dict(depth=12, hidden_size=384, num_heads=6),
}
# The paper's ablation rows (docs/dip.md), as variants of DiP: "<DiP preset>-<variant>".
ABLATIONS = {
    "mlp": dict(detailer_head="mlp"),
    "attention": dict(detailer_head="attention"),
    "coord_mlp": dict(detailer_head="coord_mlp"),
    "mid": dict(head_placement="mid"),
    "both": dict(head_placement="both"),
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
# The ablation at the paper's size (XL/16, ImageNet 256) and its tiny twins.
for _base in ("DiP-XL/16", "DiP-tiny/16"):
    for _variant, _fields in ABLATIONS.items():
        PRESETS[f"{_base}-{_variant}"] = dataclasses.replace(PRESETS[_base], **_fields)


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


__all__ = ["DiP", "DiPConfig", "FinalLayer", "PRESETS", "ABLATIONS", "HEAD_KINDS", "HEAD_PLACEMENTS",
           "build_model", "head_token"]
