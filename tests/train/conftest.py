"""Fixtures for training tests."""

from __future__ import annotations

import pytest

from dip_scale.data.synthetic import write_synthetic_shards


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory) -> str:
    """256 synthetic 32x32 images as local MDS shards (the tiny recipes' data)."""
    out = tmp_path_factory.mktemp("data") / "synthetic-32"
    write_synthetic_shards(str(out), num_images=256, resolution=32, seed=0)
    return str(out)
