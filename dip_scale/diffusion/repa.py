"""REPA: align an intermediate DiT hidden state with frozen DINOv2 features (docs/dip.md, "REPA").

    encoder = load_repa_encoder()                          # frozen DINOv2 ViT-B/14, float32, eval mode
    repa = REPA(hidden_size=1152, encoder=encoder)         # trainable projector D -> D -> D -> 768
    v_hat, hidden = model.forward_with_hidden(x_t, t, y, 8)   # hidden (B, h, w, D) after block 8
    loss = flow_loss + repa(hidden, x)                     # repa(...) = 0.5 * mean(1 - cos(proj, target))

Targets: the clean image x in [-1, 1] is mapped to [0, 1], normalised with the ImageNet mean/std and
bicubic-resized to (h*14, w*14), so that the encoder's 14-pixel patch grid equals the DiT's h x w token grid
(224 x 224 -> 16 x 16 = 256 tokens at 256 px with patch 16). The encoder's patch tokens after its final
LayerNorm, without the CLS token, are aligned token by token with the projected DiT hidden state.

The ViT is written out here with the state-dict names of the official `dinov2_vitb14_pretrain.pth`, so that
file loads with strict=True and nothing from torch.hub or timm runs. The encoder is kept outside the module
tree of REPA: REPA.state_dict(), .parameters(), .to() and DDP/FSDP wrapping see only the projector, and the
encoder follows the input to its device on first use.

Shapes: B batch, h x w token grid, N = h * w tokens, D DiT hidden size, E encoder width (768 for ViT-B),
P_e encoder patch size (14).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

DINOV2_VITB14_FILE = "dinov2_vitb14_pretrain.pth"
DINOV2_VITB14_URL = "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitb14/dinov2_vitb14_pretrain.pth"

# DINOv2 was trained on images normalised with these statistics (inputs in [0, 1]).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# ----------------------------------------------------------------------------------------------------
# DINOv2 ViT (architecture and parameter names of the official release)
# ----------------------------------------------------------------------------------------------------


class PatchEmbed(nn.Module):
    """Conv2d(3 -> E, kernel = stride = P_e): one token per non-overlapping patch, row-major."""

    def __init__(self, patch_size: int, embed_dim: int, in_channels: int = 3):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)  # (B, E, h, w)
        return x.flatten(2).transpose(1, 2)  # (B, N, E)


class Attention(nn.Module):
    """Multi-head self-attention with biased qkv and output projections (no q/k norm, no RoPE)."""

    def __init__(self, embed_dim: int, num_heads: int):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(embed_dim, 3 * embed_dim, bias=True)
        self.proj = nn.Linear(embed_dim, embed_dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, E = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, E // self.num_heads)  # (B, N, 3, H, d)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, N, d) each
        x = F.scaled_dot_product_attention(q, k, v)  # (B, H, N, d), scale d^-0.5 as in DINOv2
        return self.proj(x.transpose(1, 2).reshape(B, N, E))  # (B, N, E)


class Mlp(nn.Module):
    """Linear(E -> 4E), exact GELU, Linear(4E -> E)."""

    def __init__(self, embed_dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(embed_dim, hidden_dim, bias=True)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, embed_dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))  # (B, N, E)


class LayerScale(nn.Module):
    """Per-channel learned scale of a residual branch (CaiT); the released weights hold the trained gamma."""

    def __init__(self, embed_dim: int, init_value: float = 1.0):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((embed_dim,), init_value))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Block(nn.Module):
    """Pre-norm transformer block: x + ls1(attn(norm1(x))), then x + ls2(mlp(norm2(x)))."""

    def __init__(self, embed_dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(embed_dim, eps=1e-6)
        self.attn = Attention(embed_dim, num_heads)
        self.ls1 = LayerScale(embed_dim)
        self.norm2 = nn.LayerNorm(embed_dim, eps=1e-6)
        self.mlp = Mlp(embed_dim, int(embed_dim * mlp_ratio))
        self.ls2 = LayerScale(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))  # (B, 1+N, E)
        return x + self.ls2(self.mlp(self.norm2(x)))  # (B, 1+N, E)


class DINOv2ViT(nn.Module):
    """DINOv2 vision transformer; the defaults are ViT-B/14 (86,580,480 parameters).

    forward(x) takes ImageNet-normalised images (B, 3, H, W) with H and W multiples of the patch size and
    returns the patch tokens after the final LayerNorm, without the CLS token: (B, (H/P_e)*(W/P_e), E).

    The position embedding is stored for the training resolution `img_size` (518 px -> a 37 x 37 grid)
    and resampled bicubically to other grids the way DINOv2 does (see interpolate_pos_encoding).
    `mask_token` is unused at inference; it exists so the released state dict loads with strict=True.
    """

    def __init__(self, embed_dim: int = 768, depth: int = 12, num_heads: int = 12, patch_size: int = 14,
                 img_size: int = 518, mlp_ratio: float = 4.0):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        self.embed_dim = embed_dim
        self.patch_size = patch_size
        self.pos_grid = img_size // patch_size  # 37 for ViT-B/14 at 518 px
        self.patch_embed = PatchEmbed(patch_size, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.pos_grid ** 2, embed_dim))
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.initialize_weights()

    def initialize_weights(self):
        """DINOv2's initialisation, so a freshly built encoder behaves like a ViT (loading replaces it)."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def interpolate_pos_encoding(self, grid: tuple[int, int]) -> torch.Tensor:
        """Position embedding for an h x w patch grid: (1, 1 + h*w, E), CLS position first.

        At the native grid the stored table is returned unchanged. Elsewhere the patch part is resampled
        bicubically (align_corners=False, no antialias) in float32 with scale factors ((h + 0.1) / M,
        (w + 0.1) / M), M = 37: DINOv2 adds 0.1 so that floor(M * scale) cannot round down below the
        target size, and because the scale factor (not h / M) also sets where bicubic samples, the same
        factors are needed to reproduce its features exactly.
        """
        h, w = grid
        M = self.pos_grid
        if (h, w) == (M, M):
            return self.pos_embed  # (1, 1+M*M, E)
        E = self.pos_embed.shape[-1]
        pos = self.pos_embed.float()
        cls_pos, patch_pos = pos[:, :1], pos[:, 1:]  # (1, 1, E), (1, M*M, E)
        patch_pos = patch_pos.reshape(1, M, M, E).permute(0, 3, 1, 2)  # (1, E, M, M)
        patch_pos = F.interpolate(patch_pos, scale_factor=((h + 0.1) / M, (w + 0.1) / M), mode="bicubic")
        if patch_pos.shape[-2:] != (h, w):
            raise RuntimeError(f"position-embedding resize gave {tuple(patch_pos.shape[-2:])}, expected {(h, w)}")
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, h * w, E)  # (1, N, E), row-major
        return torch.cat([cls_pos, patch_pos], dim=1).to(self.pos_embed.dtype)  # (1, 1+N, E)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, _, H, W = x.shape
        P = self.patch_size
        if H % P or W % P:
            raise ValueError(f"encoder input {H}x{W} is not a multiple of its patch size {P}")
        tokens = self.patch_embed(x)  # (B, N, E)
        tokens = torch.cat([self.cls_token.expand(B, -1, -1), tokens], dim=1)  # (B, 1+N, E)
        tokens = tokens + self.interpolate_pos_encoding((H // P, W // P))  # (B, 1+N, E)
        for block in self.blocks:
            tokens = block(tokens)  # (B, 1+N, E)
        return self.norm(tokens)[:, 1:]  # (B, N, E), CLS dropped


# ----------------------------------------------------------------------------------------------------
# Loading the frozen encoder (never downloads)
# ----------------------------------------------------------------------------------------------------


def default_encoder_path() -> str:
    """Where torch.hub caches the official file: $TORCH_HOME/hub/checkpoints/dinov2_vitb14_pretrain.pth
    (TORCH_HOME defaults to ~/.cache/torch), so a copy fetched earlier by torch.hub is found."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", DINOV2_VITB14_FILE)


def missing_weights_message(path: str, explicit: bool) -> str:
    where = "the given path" if explicit else "the torch hub cache"
    return (
        f"REPA needs the frozen DINOv2 ViT-B/14 weights, the official file {DINOV2_VITB14_FILE} (about 346 MB), "
        f"and it is not at {where}: {path}\n"
        "Nothing is downloaded at run time. Put the file in one of two places:\n"
        f"  1. anywhere, and pass its path: load_repa_encoder(path=...) (the REPA encoder path of the config);\n"
        f"  2. the torch hub cache: {default_encoder_path()} "
        "($TORCH_HOME/hub/checkpoints/; TORCH_HOME defaults to ~/.cache/torch).\n"
        f"Get it from the official DINOv2 release: {DINOV2_VITB14_URL}"
    )


def load_repa_encoder(path: str | None = None, *, embed_dim: int = 768, depth: int = 12, num_heads: int = 12,
                      patch_size: int = 14, img_size: int = 518) -> DINOv2ViT:
    """Build the DINOv2 encoder and load its weights from `path`, or from the torch hub cache when None.

    The defaults are ViT-B/14 for the official `dinov2_vitb14_pretrain.pth`; the size arguments let tests
    load small encoders through the same path. Returns the encoder in float32, eval mode, with
    requires_grad False. Raises FileNotFoundError (saying which file, where to put it, where to get it)
    when the file is missing.
    """
    file = path if path is not None else default_encoder_path()
    if not os.path.isfile(file):
        raise FileNotFoundError(missing_weights_message(file, explicit=path is not None))
    state_dict = torch.load(file, map_location="cpu", weights_only=True)
    # Built on the meta device and filled by assignment: no time is spent initialising weights that the
    # file replaces, and strict=True still checks every name and shape.
    with torch.device("meta"):
        encoder = DINOv2ViT(embed_dim, depth, num_heads, patch_size, img_size)
    encoder.load_state_dict(state_dict, strict=True, assign=True)
    encoder.float().eval().requires_grad_(False)
    return encoder


# ----------------------------------------------------------------------------------------------------
# The alignment loss and the REPA module
# ----------------------------------------------------------------------------------------------------


def alignment_loss(projected: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """mean over batch and tokens of 1 - cosine(projected, target); (B, N, E) x 2 -> scalar, in float32."""
    cos = F.cosine_similarity(projected.float(), target.float(), dim=-1)  # (B, N)
    return (1.0 - cos).mean()


class _FrozenEncoder:
    """Holds the encoder as a plain attribute, outside the nn.Module tree, so it is not checkpointed,
    not trained, not moved by .to() and not wrapped by DDP/FSDP. Copies (e.g. an EMA of the model
    made by deepcopy) share the one frozen encoder instead of duplicating it."""

    def __init__(self, module: nn.Module):
        self.module = module

    def __deepcopy__(self, memo):
        return self


class REPA(nn.Module):
    """Trainable projector plus a reference to the frozen encoder; forward returns the weighted REPA loss.

    The projector Linear(D -> D), SiLU, Linear(D -> D), SiLU, Linear(D -> E) is trained with the DiT and
    dropped at inference. `encoder` is any module with a `patch_size` attribute whose forward maps
    ImageNet-normalised images to patch tokens (B, N, E), e.g. the result of load_repa_encoder(); REPA
    puts it in eval mode and freezes it.
    """

    def __init__(self, hidden_size: int, encoder: nn.Module, encoder_dim: int = 768, weight: float = 0.5):
        super().__init__()
        if getattr(encoder, "embed_dim", encoder_dim) != encoder_dim:
            raise ValueError(f"encoder width {encoder.embed_dim} differs from encoder_dim {encoder_dim}")
        self.weight = weight
        self.projector = nn.Sequential(
            nn.Linear(hidden_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, encoder_dim),
        )
        self._frozen = _FrozenEncoder(encoder.eval().requires_grad_(False))

    @property
    def encoder(self) -> nn.Module:
        return self._frozen.module

    def _encoder_on(self, device: torch.device) -> nn.Module:
        """The encoder, moved to `device` the first time it is used there. Its weights stay float32: under
        autocast its matmuls still run in bf16, and a cast to bf16 and back would lose precision for good."""
        encoder = self.encoder
        first = next(encoder.parameters(), None)
        if first is not None and first.device != device:
            encoder.to(device)
        return encoder

    @torch.no_grad()
    def encoder_features(self, images: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Targets for an h x w DiT grid: images (B, 3, H, W) in [-1, 1] -> (B, h*w, E), no gradient."""
        h, w = grid
        encoder = self._encoder_on(images.device)
        P = encoder.patch_size
        x = (images.float() + 1) / 2  # (B, 3, H, W) in [0, 1]
        mean = x.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = x.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
        x = (x - mean) / std
        # One encoder patch per DiT token: (h*14, w*14) pixels, 224 x 224 for a 16 x 16 grid.
        x = F.interpolate(x, size=(h * P, w * P), mode="bicubic", align_corners=False)  # (B, 3, h*P, w*P)
        return encoder(x)  # (B, N, E)

    def forward(self, hidden: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """weight * mean(1 - cos(projector(hidden), encoder_features(images, grid))), a scalar.

        hidden: (B, h, w, D) DiT hidden state on its h x w token grid (DiP.forward_with_hidden); images:
        (B, 3, H, W) clean images in [-1, 1] (the data x, not the noisy x_t), resized to the grid here."""
        if hidden.ndim != 4:
            raise ValueError(f"hidden must be a token grid (B, h, w, D), got shape {tuple(hidden.shape)}")
        if images.ndim != 4 or images.shape[0] != hidden.shape[0] or images.shape[1] != 3:
            raise ValueError(f"images must be ({hidden.shape[0]}, 3, H, W), got {tuple(images.shape)}")
        grid = (hidden.shape[1], hidden.shape[2])
        target = self.encoder_features(images, grid)  # (B, N, E)
        projected = self.projector(hidden.flatten(1, 2))  # (B, N, E), tokens row-major as the encoder's
        return self.weight * alignment_loss(projected, target)


__all__ = ["DINOv2ViT", "REPA", "alignment_loss", "default_encoder_path", "load_repa_encoder",
           "DINOV2_VITB14_FILE", "DINOV2_VITB14_URL"]
