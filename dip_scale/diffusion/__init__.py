"""What is trained and how it is sampled. Knows the network only by the models package's interface:
forward(x, t, y), the token grid REPA aligns (forward_with_hidden), channels_last_weights."""

from dip_scale.diffusion.ema import ema_update, make_ema
from dip_scale.diffusion.flow import FlowMatching
from dip_scale.diffusion.sampler import SamplerConfig, sample, sample_noise

__all__ = ["ema_update", "make_ema", "FlowMatching", "SamplerConfig", "sample", "sample_noise"]
