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


@pytest.fixture(scope="session")
def epoch_shards(tmp_path_factory) -> str:
    """48 synthetic 32x32 images: three steps per epoch at the resumption tests' global batch of 16."""
    from tests.train.runs import make_data

    return make_data(tmp_path_factory.mktemp("data") / "epoch-48")


@pytest.fixture(scope="session")
def straight_run(tmp_path_factory, epoch_shards):
    """The reference for the resumption tests: the tiny recipe trained without interruption, one process."""
    from tests.train.runs import straight

    return straight(tmp_path_factory.mktemp("straight"), epoch_shards)
