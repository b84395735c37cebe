"""Test inputs for the eval tests: Inception weights of the right architecture, and small image sets.

The real Inception weights are a 95 MB download. Tests build torch-fidelity's network with its weight
loading bypassed, He-initialise the convolutions (PyTorch's default init makes every feature ~1e-8, so
every FID would be ~0) and save the state dict, which then goes through our real offline loading path.
"""

from __future__ import annotations

from unittest import mock

import numpy as np
import torch
from torch import nn


def make_test_inception_weights(path) -> None:
    import torch_fidelity.feature_extractor_inceptionv3 as tfi

    with mock.patch.object(tfi, "load_state_dict_from_url", lambda *a, **k: {}), \
            mock.patch.object(tfi.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None):
        net = tfi.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    g = torch.Generator().manual_seed(0)
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            fan_in = m.weight[0].numel()
            with torch.no_grad():
                m.weight.normal_(0.0, (2.0 / fan_in) ** 0.5, generator=g)
    torch.save(net.state_dict(), path)


def blobs(n: int, size: int, seed: int, bright: float = 0.0) -> np.ndarray:
    """n smooth random uint8 images (n, size, size, 3); `bright` shifts the whole distribution."""
    rng = np.random.default_rng(seed)
    low = rng.uniform(0, 1, (n, 4, 4, 3))
    x = np.kron(low, np.ones((1, size // 4, size // 4, 1)))
    x = 0.7 * x + 0.3 * rng.uniform(0, 1, x.shape) + bright
    return (np.clip(x, 0, 1) * 255).round().astype(np.uint8)
