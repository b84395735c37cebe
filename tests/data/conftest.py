"""Fixtures for the data tests: small synthetic datasets written once per session, fresh cache folders."""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from data_prep.synthetic import write_synthetic_shards


@pytest.fixture(scope="session")
def synthetic_dataset(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., str]:
    """`synthetic_dataset(num_images, resolution, encoding, seed=0)` -> path of a merged local dataset.

    Datasets are written once per session per argument set and must be treated as read-only.
    """
    made: dict[tuple, str] = {}

    def make(num_images: int = 64, resolution: int = 16, encoding: str = "png", seed: int = 0,
             chunk_size: int = 16) -> str:
        key = (num_images, resolution, encoding, seed, chunk_size)
        if key not in made:
            out = tmp_path_factory.mktemp(f"synthetic-{encoding}-{resolution}")
            write_synthetic_shards(str(out), num_images, resolution, seed, encoding, chunk_size=chunk_size)
            made[key] = str(out)
        return made[key]

    return make


@pytest.fixture
def cache_dir(tmp_path: Path) -> Iterator[str]:
    """A local cache folder no other test uses; Streaming's per-dataset shared memory is let go after."""
    path = tmp_path / "cache"
    path.mkdir()
    yield str(path)
    gc.collect()  # runs StreamingDataset.__del__, which releases the folder's shared-memory registration
