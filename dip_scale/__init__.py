"""dip_scale: train DiP, a pixel-space Diffusion Transformer with a Patch Detailer Head, at scale."""

__version__ = "0.1.0"
