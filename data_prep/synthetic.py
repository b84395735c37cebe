"""The synthetic image set (dip_scale.data.synthetic) as a merged MDS dataset, in one call: what the demo,
the tests and the benchmarks train on.

    write_synthetic_shards("runs/data/synthetic-32", num_images=2048, resolution=32)
"""

from __future__ import annotations

from data_prep.sources import SyntheticSource
from data_prep.write import WriteOptions, WriteSummary, write_dataset


def write_synthetic_shards(
    out: str,
    num_images: int,
    resolution: int,
    seed: int = 0,
    encoding: str = "png",
    *,
    jpeg_quality: int = 95,
    compression: str | None = None,
    chunk_size: int = 256,
    num_workers: int = 1,
    progress: bool = False,
) -> WriteSummary:
    """Write `num_images` synthetic images as a merged MDS dataset at `out` (a folder or s3:// URL).

    The same code path as `dip-prep write synthetic`; rerunning it into the same `out` resumes. With
    num_workers > 1 the caller's main module must be import-safe (`if __name__ == "__main__":`), as for
    any multiprocessing.
    """
    options = WriteOptions(resolution=resolution, encoding=encoding, jpeg_quality=jpeg_quality,
                           compression=compression, chunk_size=chunk_size, num_workers=num_workers,
                           progress=progress)
    return write_dataset(SyntheticSource(num_images=num_images, seed=seed), out, options)
