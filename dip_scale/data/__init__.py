"""Data: the ADM crop, the synthetic set, the dataset layout and the streaming loader.

    from dip_scale.data import build_dataloader, read_dataset_info
    loader = build_dataloader("s3://bucket/imagenet256", batch_size=32, num_workers=8, shuffle=True)

Datasets are written by the `dip-prep` CLI (package data_prep), which uses the same crop and layout.
"""

from dip_scale.data.adm_crop import adm_center_crop
from dip_scale.data.job_cache import job_cache_dir
from dip_scale.data.layout import read_dataset_info
from dip_scale.data.shared_memory import clean_stale_shared_memory
from dip_scale.data.streaming import DiPStreamingDataset, build_dataloader, images_to_float
from dip_scale.data.synthetic import SYNTHETIC_CLASSES, synthetic_image, write_synthetic_shards

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
    "write_synthetic_shards",
]
