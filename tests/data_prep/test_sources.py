"""Sources list their items in a fixed order with the right labels, and report what they cannot use."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_prep.errors import PrepError
from data_prep.sources import BadInput, FolderSource, ImageNetSource, SyntheticSource
from dip_scale.data import adm_center_crop, synthetic_image
from tests.data_prep.image_tree import ImageTree


def test_folder_source_order_labels_and_problems(image_tree: ImageTree) -> None:
    source = FolderSource(str(image_tree.root))
    assert source.class_names == image_tree.classes
    items = source.items(0, source.num_items)
    good = [(item.key, item.label) for item in items if item.key not in image_tree.bad]
    assert good == image_tree.good
    assert sorted(item.key for item in items if item.key in image_tree.bad) == sorted(image_tree.bad)
    assert ".DS_Store" not in " ".join(item.key for item in items)
    assert sorted(problem.key for problem in source.problems) == image_tree.source_problems
    empty = next(problem for problem in source.problems if problem.key == "empty_class/")
    assert empty.reason == "empty class folder" and empty.label == image_tree.classes.index("empty_class")


def test_folder_loader_crops_and_rejects_bad_files(image_tree: ImageTree) -> None:
    source = FolderSource(str(image_tree.root))
    loader = source.loader()
    items = {item.key: item for item in source.items(0, source.num_items)}
    key = image_tree.good[0][0]
    np.testing.assert_array_equal(loader.load(items[key], 24), adm_center_crop(Image.open(image_tree.root / key), 24))
    for key, word in image_tree.bad.items():
        with pytest.raises(BadInput, match=word):
            loader.load(items[key], 24)


def test_listing_hash_tracks_the_tree(image_tree: ImageTree) -> None:
    before = FolderSource(str(image_tree.root)).describe()
    assert FolderSource(str(image_tree.root)).describe() == before
    Image.new("RGB", (8, 8)).save(image_tree.root / "cat" / "z.png")
    after = FolderSource(str(image_tree.root)).describe()
    assert after["listing_sha256"] != before["listing_sha256"] and after["num_items"] == before["num_items"] + 1


def test_folder_source_errors(tmp_path: Path) -> None:
    with pytest.raises(PrepError, match="does not exist"):
        FolderSource(str(tmp_path / "missing"))
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.jpg").write_bytes(b"")
    with pytest.raises(PrepError, match="no class sub-folders"):
        FolderSource(str(tmp_path / "flat"))


def _imagenet(root: Path, synsets: list[str]) -> None:
    for number, synset in enumerate(synsets):
        (root / synset).mkdir(parents=True)
        Image.new("RGB", (10, 12), (number, 0, 0)).save(root / synset / f"{synset}_1.JPEG")


def test_imagenet_labels_follow_the_mapping_file_for_subsets(tmp_path: Path) -> None:
    # The Kaggle layout: ILSVRC/Data/CLS-LOC/train with LOC_synset_mapping.txt four folders up.
    train = tmp_path / "ILSVRC" / "Data" / "CLS-LOC" / "train"
    _imagenet(train, ["n00000003", "n00000001"])
    (tmp_path / "LOC_synset_mapping.txt").write_text(
        "n00000001 tench, Tinca tinca\nn00000002 goldfish\nn00000003 great white shark\n")
    source = ImageNetSource(str(train))
    assert source.synsets == ["n00000001", "n00000002", "n00000003"]
    assert source.class_names == ["tench, Tinca tinca", "goldfish", "great white shark"]
    assert [(item.key, item.label) for item in source.items(0, 2)] == [
        ("n00000001/n00000001_1.JPEG", 0), ("n00000003/n00000003_1.JPEG", 2)]
    assert any("2 synset folders" in note for note in source.notes)


def test_imagenet_without_mapping_uses_sorted_folders(tmp_path: Path) -> None:
    _imagenet(tmp_path / "train", ["n00000009", "n00000004"])
    source = ImageNetSource(str(tmp_path / "train"))
    assert source.class_names == source.synsets == ["n00000004", "n00000009"]
    assert any("no synset mapping" in note for note in source.notes)


def test_imagenet_rejects_non_synset_folders_and_unknown_synsets(tmp_path: Path) -> None:
    _imagenet(tmp_path / "a", ["n00000001", "cats"])
    with pytest.raises(PrepError, match=r"\['cats'\] are not synset ids"):
        ImageNetSource(str(tmp_path / "a"))
    _imagenet(tmp_path / "b", ["n00000001", "n00000007"])
    mapping = tmp_path / "map.txt"
    mapping.write_text("n00000001 tench\n")
    with pytest.raises(PrepError, match=r"\['n00000007'\] are not in the mapping file"):
        ImageNetSource(str(tmp_path / "b"), synset_mapping=str(mapping))
    mapping.write_text("tench n00000001\n")
    with pytest.raises(PrepError, match="map.txt:1: expected"):
        ImageNetSource(str(tmp_path / "b"), synset_mapping=str(mapping))


def test_synthetic_source() -> None:
    source = SyntheticSource(num_images=25, seed=3)
    items = source.items(20, 30)
    assert [item.key for item in items] == ["20", "21", "22", "23", "24"]
    np.testing.assert_array_equal(source.loader().load(items[1], 12), synthetic_image(21, 12, seed=3)[0])
    assert source.describe() == {"kind": "synthetic", "num_items": 25, "num_classes": 10, "seed": 3}
    with pytest.raises(PrepError, match="--num-images must be positive"):
        SyntheticSource(num_images=0)
