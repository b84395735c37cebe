"""Fixtures for the dip-prep tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.data_prep.image_tree import ImageTree, make_image_tree


@pytest.fixture
def image_tree(tmp_path: Path) -> ImageTree:
    return make_image_tree(tmp_path / "tree")
