"""The DiP network: plain PyTorch for one device (no Composer, DeepSpeed or Streaming here)."""

from dip_scale.models.dip import HEAD_KINDS, PRESETS, DiP, DiPConfig, build_model

__all__ = ["DiP", "DiPConfig", "PRESETS", "HEAD_KINDS", "build_model"]
