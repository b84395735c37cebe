"""Data: the ADM crop, the synthetic set, the dataset layout and the streaming loader.

    from dip_scale.data import build_dataloader, read_dataset_info
    loader = build_dataloader("s3://bucket/imagenet256", batch_size=32, num_workers=8, shuffle=True)

Datasets are written by the `dip-prep` CLI (package data_prep), which uses the same crop and layout.
Names are imported on first use: the loader pulls in torch and Streaming (seconds), which the crop, the
synthetic set and `dip-prep --help` do not need.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dip_scale.data.adm_crop import adm_center_crop
    from dip_scale.data.job_cache import job_cache_dir
    from dip_scale.data.layout import read_dataset_info
    from dip_scale.data.shared_memory import clean_stale_shared_memory
    from dip_scale.data.streaming import DiPStreamingDataset, build_dataloader, images_to_float
    from dip_scale.data.synthetic import SYNTHETIC_CLASSES, synthetic_image

_EXPORTS = {
    "adm_center_crop": "dip_scale.data.adm_crop",
    "job_cache_dir": "dip_scale.data.job_cache",
    "read_dataset_info": "dip_scale.data.layout",
    "clean_stale_shared_memory": "dip_scale.data.shared_memory",
    "DiPStreamingDataset": "dip_scale.data.streaming",
    "build_dataloader": "dip_scale.data.streaming",
    "images_to_float": "dip_scale.data.streaming",
    "SYNTHETIC_CLASSES": "dip_scale.data.synthetic",
    "synthetic_image": "dip_scale.data.synthetic",
}
__all__ = [
    "SYNTHETIC_CLASSES",
    "DiPStreamingDataset",
    "adm_center_crop",
    "build_dataloader",
    "clean_stale_shared_memory",
    "images_to_float",
    "job_cache_dir",
    "read_dataset_info",
    "synthetic_image",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'dip_scale.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
