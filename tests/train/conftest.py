"""Fixtures for training tests."""

from __future__ import annotations

import pytest


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
