"""Test inputs for the eval tests: Inception weights of the right architecture, and small image sets.

The real Inception weights are a 95 MB download. Tests build torch-fidelity's network with its weight
loading bypassed, He-initialise the convolutions (PyTorch's default init makes every feature ~1e-8, so
every FID would be ~0) and save the state dict, which then goes through our real offline loading path.
"""

from __future__ import annotations

import numpy as np

from dip_scale.eval.inception import write_random_weights


def make_test_inception_weights(path) -> None:
    write_random_weights(path, seed=0)


def blobs(n: int, size: int, seed: int, bright: float = 0.0) -> np.ndarray:
    """n smooth random uint8 images (n, size, size, 3); `bright` shifts the whole distribution."""
    rng = np.random.default_rng(seed)
    low = rng.uniform(0, 1, (n, 4, 4, 3))
    x = np.kron(low, np.ones((1, size // 4, size // 4, 1)))
    x = 0.7 * x + 0.3 * rng.uniform(0, 1, x.shape) + bright
    return (np.clip(x, 0, 1) * 255).round().astype(np.uint8)
