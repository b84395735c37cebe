"""The DiP network: plain PyTorch for one device (no Composer, DeepSpeed or Streaming here).

Interface: build_model / DiPConfig / PRESETS to make one; model(x, t, y) -> velocity and
model.forward_with_hidden(x, t, y, block) -> (velocity, token grid) to use it; channels_last_weights to
lay its convolutions out for cuDNN.
"""

from dip_scale.models.dip import HEAD_KINDS, HEAD_PLACEMENTS, PRESETS, DiP, DiPConfig, build_model
from dip_scale.models.layout import channels_last_weights

__all__ = ["DiP", "DiPConfig", "PRESETS", "HEAD_KINDS", "HEAD_PLACEMENTS", "build_model", "channels_last_weights"]
