"""Fixtures for the eval tests (see images.py for how the Inception test weights are made)."""

from __future__ import annotations

import os

import pytest

from tests.eval.images import make_test_inception_weights

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(scope="session")
def inception_weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("inception") / "test-inception.pth"
    make_test_inception_weights(path)
    return path


@pytest.fixture(scope="session")
def inception(inception_weights):
    from dip_scale.eval.inception import InceptionFeatures

    return InceptionFeatures(inception_weights)
