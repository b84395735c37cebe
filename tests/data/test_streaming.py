"""The loader: exact S3 round trips, deterministic order, mid-epoch resume, outputs, stream mixing."""

from __future__ import annotations

import gc
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data_prep.cli import main
from data_prep.synthetic import write_synthetic_shards
from dip_scale.data import (
    DiPStreamingDataset,
    adm_center_crop,
    build_dataloader,
    images_to_float,
    job_cache_dir,
    read_dataset_info,
    synthetic_image,
)
from tests.data_prep.image_tree import make_image_tree

SyntheticFactory = Callable[..., str]


def _epoch(loader: torch.utils.data.DataLoader, max_batches: int | None = None) -> list[int]:
    """Sample indices in the order the loader yields them."""
    seen: list[int] = []
    for number, (_, _, indices) in enumerate(loader):
        if max_batches is not None and number == max_batches:
            break
        seen += indices.tolist()
    return seen


@pytest.mark.parametrize("encoding", ["png", "raw", "jpeg"])
def test_s3_round_trip_image_by_image(encoding: str, s3_url: str, tmp_path: Path, cache_dir: str) -> None:
    tree = make_image_tree(tmp_path / "tree")
    assert main(["write", "folder", str(tree.root), s3_url, "--resolution", "24", "--encoding", encoding,
                 "--chunk-size", "2", "--no-progress"]) == 0
    loader = build_dataloader(remote=s3_url, local=cache_dir, batch_size=2, num_workers=2, return_index=True,
                              drop_last=False)
    got: dict[int, tuple[np.ndarray, int]] = {}
    for images, labels, indices in loader:
        assert images.dtype == torch.uint8 and images.shape[1:] == (3, 24, 24) and labels.dtype == torch.int64
        for image, label, index in zip(images, labels, indices):
            got[int(index)] = (image.permute(1, 2, 0).numpy(), int(label))
    assert sorted(got) == list(range(len(tree.good)))
    for index, (key, label) in enumerate(tree.good):
        want = adm_center_crop(Image.open(tree.root / key), 24)
        image, got_label = got[index]
        assert got_label == label, key
        if encoding == "jpeg":  # lossy; these are pure-noise images, JPEG's worst case
            assert np.abs(image.astype(int) - want).mean() < 12, key
        else:
            np.testing.assert_array_equal(image, want, err_msg=key)
    assert loader.dataset.class_names == tree.classes
    del loader


def test_same_seed_same_order_and_a_full_permutation(synthetic_dataset: SyntheticFactory) -> None:
    data = synthetic_dataset(num_images=64)

    def order(seed: int) -> list[int]:
        loader = build_dataloader(local=data, batch_size=4, num_workers=0, shuffle=True, shuffle_seed=seed,
                                  return_index=True)
        return _epoch(loader)

    first = order(7)
    assert first == order(7)
    assert sorted(first) == list(range(64)) and first != list(range(64))
    assert order(8) != first


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_mid_epoch_yields_exactly_the_rest(num_workers: int, synthetic_dataset: SyntheticFactory) -> None:
    data = synthetic_dataset(num_images=64)

    def loader() -> torch.utils.data.DataLoader:
        return build_dataloader(local=data, batch_size=4, num_workers=num_workers, shuffle=True, shuffle_seed=3,
                                return_index=True, persistent_workers=False)

    whole = _epoch(loader())
    interrupted = loader()
    first_part = _epoch(interrupted, max_batches=5)
    assert first_part == whole[:20]
    # What Composer stores in a checkpoint: the dataset state at samples seen in this epoch.
    state = interrupted.dataset.state_dict(num_samples=len(first_part), from_beginning=True)
    del interrupted
    gc.collect()

    resumed = loader()
    resumed.dataset.load_state_dict(state)
    assert _epoch(resumed) == whole[20:]


def test_float_output(synthetic_dataset: SyntheticFactory) -> None:
    data = synthetic_dataset(num_images=16)
    as_uint8 = DiPStreamingDataset(local=data, batch_size=1)
    as_float = DiPStreamingDataset(local=data, batch_size=1, output="float")
    image, label = as_float[3]
    assert image.dtype == torch.float32 and image.shape == (3, 16, 16)
    assert image.min() >= -1 and image.max() <= 1
    torch.testing.assert_close(image, images_to_float(as_uint8[3][0]))
    assert torch.equal(as_uint8[3][0].permute(1, 2, 0), torch.from_numpy(synthetic_image(3, 16)[0]))
    assert label == 3 and as_uint8.resolution == 16 and as_uint8.num_classes == 10


def test_streams_mix_by_proportion(synthetic_dataset: SyntheticFactory) -> None:
    forty = synthetic_dataset(num_images=40, seed=0)
    twenty = synthetic_dataset(num_images=20, seed=1)
    loader = build_dataloader(streams=[{"local": forty, "proportion": 0.25}, {"local": twenty, "proportion": 0.75}],
                              batch_size=4, num_workers=0, shuffle=True, shuffle_seed=0, return_index=True,
                              epoch_size=40)
    seen = _epoch(loader)
    assert len(seen) == 40
    # Global indices: stream 0 first (0..39), then stream 1 (40..59).
    assert sum(index < 40 for index in seen) == 10
    assert sum(index >= 40 for index in seen) == 30  # 20 samples, 10 of them twice
    image, _, index = loader.dataset[45]
    assert index == 45 and torch.equal(image.permute(1, 2, 0), torch.from_numpy(synthetic_image(5, 16, seed=1)[0]))


def test_streams_must_agree_on_resolution_and_classes(synthetic_dataset: SyntheticFactory) -> None:
    small, large = synthetic_dataset(num_images=16, resolution=8), synthetic_dataset(num_images=16, resolution=16)
    with pytest.raises(ValueError, match=f"stream {large} has resolution 16, the first stream 8"):
        DiPStreamingDataset(streams=[{"local": small}, {"local": large}], batch_size=1)


@pytest.mark.parametrize("kwargs,message", [
    ({"streams": [{"local": "x", "weight": 1}]}, r"stream 0: unknown key\(s\) \['weight'\]"),
    ({"remote": "x", "streams": [{"local": "y"}]}, "either `streams` or `remote`/`local`"),
    ({}, "give `remote`"),
    ({"local": "x", "output": "bf16"}, "output must be one of"),
])
def test_bad_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DiPStreamingDataset(batch_size=1, **kwargs)


def test_missing_dataset_json_is_explained(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no dataset.json at .*: not a dip-prep dataset"):
        DiPStreamingDataset(local=str(tmp_path), batch_size=1)


def test_remote_is_cached_in_the_job_folder(s3_url: str, tmp_path: Path) -> None:
    write_synthetic_shards(s3_url, num_images=8, resolution=8)
    assert read_dataset_info(s3_url)["num_samples"] == 8
    base = str(tmp_path / "jobs")
    ds = DiPStreamingDataset(remote=s3_url, batch_size=2, cache_dir=base)
    local = ds.streams[0].local
    assert local.startswith(job_cache_dir(base) + "/") and Path(local).name.startswith(s3_url.rsplit("/", 1)[-1])
    assert ds[7][1] == 7 and (Path(local) / "index.json").exists()
    del ds
