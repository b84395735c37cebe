"""Converter between the authors' released DiP checkpoint and our DiP module.

The released state dict names (docs/dip.md, "The released checkpoint") map onto ours one to one:
    s_embedder.*, t_embedder.*, y_embedder.*  -> trunk.<same>
    blocks.i.<...>.adaLN_modulation.0.*        -> trunk.blocks.i.<...>.adaLN_modulation.*
    blocks.i.*                                 -> trunk.blocks.i.*
    local_decoder.*                            -> detailer.*
Tensors are copied unchanged: our patch order, RoPE layout and chunk order equal the released ones.

    sd = torch.load("dip_xl_16.ckpt", map_location="cpu", weights_only=True)
    model = build_model(infer_config(sd)); model.load_state_dict(convert_official_state_dict(sd))
"""

from __future__ import annotations

import math
import re
import warnings
from pathlib import Path

import torch

from dip_scale.models.dip import DiP, DiPConfig, build_model

# Prefixes under which a Lightning checkpoint holds the network, most preferred first (EMA weights win).
MODEL_PREFIXES = ("ema_denoiser.", "ema_model.", "ema.", "denoiser.", "model.", "net.", "")


def _rename(key: str) -> str | None:
    """Released name -> our name; None for keys that are not part of the network."""
    if key.startswith(("s_embedder.", "t_embedder.", "y_embedder.")):
        return "trunk." + key
    if key.startswith("blocks."):
        return "trunk." + re.sub(r"adaLN_modulation\.0\.", "adaLN_modulation.", key)
    if key.startswith("local_decoder."):
        return "detailer." + key[len("local_decoder."):]
    return None


def _unrename(key: str) -> str:
    """Our name -> released name."""
    if key.startswith("trunk.blocks."):
        return re.sub(r"adaLN_modulation\.", "adaLN_modulation.0.", key[len("trunk."):])
    if key.startswith("trunk."):
        return key[len("trunk."):]
    if key.startswith("detailer."):
        return "local_decoder." + key[len("detailer."):]
    raise KeyError(f"{key} has no counterpart in the released checkpoint (only the DiP conv head is released)")


def extract_model_state_dict(checkpoint: dict) -> dict[str, torch.Tensor]:
    """Return the bare released-name state dict from a bare state dict or a Lightning checkpoint,
    preferring EMA weights when both are present."""
    sd = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(sd, dict):
        raise ValueError(f"expected a state dict or a Lightning checkpoint dict, got {type(checkpoint).__name__}")
    for prefix in MODEL_PREFIXES:
        if prefix + "s_embedder.proj.weight" in sd:
            return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    sample = sorted(sd)[:5]
    raise KeyError(f"no DiP network found: expected a key 's_embedder.proj.weight' under one of the prefixes "
                   f"{[p for p in MODEL_PREFIXES if p]} or none; first keys are {sample}")


def infer_config(sd: dict[str, torch.Tensor]) -> DiPConfig:
    """Architecture of a released-name state dict (bare, or inside a Lightning checkpoint)."""
    sd = extract_model_state_dict(sd)
    for key in ("s_embedder.proj.weight", "y_embedder.embedding_table.weight", "blocks.0.attn.q_norm.weight"):
        if key not in sd:
            raise KeyError(f"released checkpoint is missing {key!r}")
    hidden, patch_dim = sd["s_embedder.proj.weight"].shape
    patch_size = math.isqrt(patch_dim // 3)
    head_dim = sd["blocks.0.attn.q_norm.weight"].shape[0]
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    ffn = sd["blocks.0.mlp.w1.weight"].shape[0]
    has_head = "local_decoder.enc1.0.weight" in sd
    return DiPConfig(
        depth=depth, hidden_size=hidden, num_heads=hidden // head_dim, patch_size=patch_size,
        num_classes=sd["y_embedder.embedding_table.weight"].shape[0] - 1,
        detailer_head="unet" if has_head else "none",
        detailer_width=sd["local_decoder.enc1.0.weight"].shape[0] if has_head else 64,
        mlp_ratio=ffn * 3 / (2 * hidden),
    )


def convert_official_state_dict(checkpoint: dict, config: DiPConfig | None = None) -> dict[str, torch.Tensor]:
    """Released checkpoint (bare state dict or Lightning checkpoint) -> state dict that our DiP loads with
    strict=True. Missing or mis-shaped keys raise, naming the key; keys outside the network (e.g. the REPA
    projector) are dropped with a warning."""
    sd = extract_model_state_dict(checkpoint)
    config = config or infer_config(sd)
    with torch.device("meta"):
        expected = build_model(config).state_dict()
    out, dropped = {}, []
    for key, value in sd.items():
        ours = _rename(key)
        if ours is None or ours not in expected:
            dropped.append(key)
            continue
        if tuple(value.shape) != tuple(expected[ours].shape):
            raise ValueError(f"released checkpoint key {key!r} has shape {tuple(value.shape)}, expected "
                             f"{tuple(expected[ours].shape)} for {config}")
        out[ours] = value
    missing = [_unrename(k) for k in expected if k not in out]
    if missing:
        raise KeyError(f"released checkpoint is missing {len(missing)} key(s), first {missing[0]!r}: {missing[:5]}")
    if dropped:
        warnings.warn(f"ignored {len(dropped)} key(s) that are not part of the DiP network: {dropped[:5]}")
    return out


def to_official_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict -> the released names (for round trips and for sharing weights back)."""
    return {_unrename(k): v for k, v in state_dict.items()}


def load_official_checkpoint(path: str | Path, trust_pickle: bool = False) -> DiP:
    """Load the released checkpoint file into our DiP (float32, eval mode).

    Lightning checkpoints pickle hyper-parameters; with weights_only loading refused, pass trust_pickle=True
    only for a file from a source you trust (unpickling runs code)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"released DiP checkpoint not found: {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError for Lightning's pickled hyper-parameters
        if not trust_pickle:
            raise ValueError(f"{path} holds more than tensors and cannot be loaded safely ({err}); if you trust "
                             "the file, pass --trust-checkpoint (trust_pickle=True)") from err
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    sd = extract_model_state_dict(checkpoint)
    model = build_model(infer_config(sd))
    model.load_state_dict(convert_official_state_dict(sd), strict=True)
    return model.eval()
