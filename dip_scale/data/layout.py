"""How a dip_scale dataset lies in its folder (local or s3://), and how to read its metadata.

    <root>/
      index.json        Streaming's merged index: every shard of every part, in chunk order
      dataset.json      our metadata (below), written by the merge next to index.json
      skipped.jsonl     one JSON line per source input that was skipped, with the reason
      plan.json         what `dip-prep write` was asked to do; reruns must ask for the same
      part-00000/       chunk 0: Streaming's index.json and shards, then done.json once complete
      part-00001/ ...

Each sample has two MDS columns: `image` (jpeg or png bytes, or a raw `ndarray:uint8:R,R,3`) and `label`
(`int`, the class index). The merge writes index.json last, so a folder with an index.json is complete.
A sample's index in the dataset is its position in index.json's order, which is the source order minus
skipped inputs; the split into chunks and tasks does not change it.
"""

from __future__ import annotations

from typing import Any

from dip_scale.storage import open_store

DATASET_FORMAT = "dip_scale.mds/1"
INDEX_FILE = "index.json"
DATASET_INFO_FILE = "dataset.json"
SKIPPED_FILE = "skipped.jsonl"
PLAN_FILE = "plan.json"
DONE_FILE = "done.json"

IMAGE_COLUMN = "image"
LABEL_COLUMN = "label"
IMAGE_ENCODINGS = ("jpeg", "png", "raw")
"""Choices for the image column: JPEG (lossy, smallest), PNG (lossless), raw uint8 (lossless, fastest)."""


def part_name(chunk: int) -> str:
    """Folder of chunk `chunk`; five digits keep listings sorted up to 100,000 chunks."""
    return f"part-{chunk:05d}"


def image_column_encoding(encoding: str, resolution: int) -> str:
    """The Streaming MDS column encoding for images stored as `encoding` at `resolution`."""
    if encoding not in IMAGE_ENCODINGS:
        raise ValueError(f"image encoding must be one of {IMAGE_ENCODINGS}, got {encoding!r}")
    if encoding == "raw":
        # Shape in the column type: samples carry no header and decode to a view without copying.
        return f"ndarray:uint8:{resolution},{resolution},3"
    return encoding


_REQUIRED_INFO_KEYS = {
    "format": str, "num_samples": int, "num_classes": int, "class_names": list, "resolution": int,
    "encoding": str,
}


def read_dataset_info(url: str) -> dict[str, Any]:
    """The metadata of the dataset at `url` (a local folder or s3://bucket/prefix), from its dataset.json.

    Keys: format, num_samples, num_skipped, num_classes, class_names, synsets (ImageNet, else None),
    class_counts, resolution, encoding, jpeg_quality, compression, num_shards, bytes, source.
    """
    folder = open_store(url)
    try:
        info = folder.read_json(DATASET_INFO_FILE)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"no {DATASET_INFO_FILE} at {folder.url_of(DATASET_INFO_FILE)}: not a dip-prep dataset, or "
            f"`dip-prep merge {url}` has not been run yet") from None
    where = folder.url_of(DATASET_INFO_FILE)
    if not isinstance(info, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(info).__name__}")
    for key, kind in _REQUIRED_INFO_KEYS.items():
        if key not in info:
            raise ValueError(f"{where}: missing key {key!r}")
        if not isinstance(info[key], kind):
            raise ValueError(f"{where}: key {key!r} should be {kind.__name__}, got {info[key]!r}")
    if info["format"] != DATASET_FORMAT:
        raise ValueError(f"{where}: format {info['format']!r} is not the supported {DATASET_FORMAT!r}")
    if len(info["class_names"]) != info["num_classes"]:
        raise ValueError(f"{where}: {len(info['class_names'])} class_names for num_classes={info['num_classes']}")
    return info
