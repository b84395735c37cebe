"""Data loading throughput: images/s per CPU core for each shard encoding, against decoding the originals.

    python bench/data_bench.py                          # 200 images, 256 px: about a minute on a laptop
    python bench/data_bench.py --num-images 1000 --resolution 512 --workers 8

What is timed, in one process with one thread, in CPU seconds of that process (so rates are per core and
hold on a busy machine too):
  baseline   open each original JPEG with PIL, decode it, ADM centre crop, to a uint8 CHW tensor: what a
             loader over the raw ImageNet folder does for every sample of every epoch
  jpeg/png/raw   DiPStreamingDataset over local shards written by dip-prep (read, decode the stored
             crop, to a uint8 CHW tensor)
The originals are ImageNet-sized (500x375, the most common ImageNet shape) JPEGs at quality 90, made from
the synthetic set, whose pixel-scale textures compress worse than photos: stored bytes are pessimistic
and decode rates roughly photo-like. With --workers N the shards are also read through a DataLoader with
N worker processes (total images/s, not per core).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm

from data_prep.sources import FolderSource
from data_prep.write import WriteOptions, write_dataset
from dip_scale.data import DiPStreamingDataset, adm_center_crop, build_dataloader, synthetic_image

SOURCE_SIZE = (500, 375)


def make_originals(root: Path, num_images: int) -> list[Path]:
    """ImageNet-like source JPEGs, ten class folders."""
    paths = []
    for index in tqdm(range(num_images), desc="originals", unit="img"):
        image, label = synthetic_image(index, SOURCE_SIZE[0], seed=1)
        path = root / f"class{label}" / f"{index:06d}.JPEG"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image[: SOURCE_SIZE[1]]).save(path, quality=90)
        paths.append(path)
    return paths


def time_baseline(paths: list[Path], resolution: int) -> float:
    started = time.process_time()
    for path in paths:
        with Image.open(path) as image:
            image.load()
            torch.from_numpy(adm_center_crop(image, resolution)).permute(2, 0, 1)
    return len(paths) / (time.process_time() - started)


def time_shards(dataset_dir: str) -> float:
    dataset = DiPStreamingDataset(local=dataset_dir, batch_size=1)
    for index in range(min(8, dataset.num_samples)):  # warm the page cache and the decoders
        dataset[index]
    started = time.process_time()
    for index in range(dataset.num_samples):
        dataset[index]
    rate = dataset.num_samples / (time.process_time() - started)
    del dataset
    return rate


def time_loader(dataset_dir: str, workers: int) -> float:
    """Wall-clock images/s through a DataLoader with `workers` processes (not per core)."""
    loader = build_dataloader(local=dataset_dir, batch_size=32, num_workers=workers, drop_last=False,
                              persistent_workers=False)
    next(iter(loader))  # worker start-up is not throughput
    started = time.perf_counter()
    count = sum(images.shape[0] for images, _ in loader)
    return count / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--num-images", type=int, default=200)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--encodings", default="jpeg,png,raw")
    parser.add_argument("--jpeg-quality", type=int, default=95)
    parser.add_argument("--workers", type=int, default=0, help="also time a DataLoader with this many workers")
    parser.add_argument("--dir", default=None, help="scratch folder (default: a temporary one)")
    args = parser.parse_args()
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory(prefix="dip-data-bench-", dir=args.dir) as scratch:
        root = Path(scratch)
        paths = make_originals(root / "originals", args.num_images)
        source_bytes = sum(p.stat().st_size for p in paths) / len(paths)
        baseline = time_baseline(paths, args.resolution)
        rows = [("baseline (PIL + ADM crop)", source_bytes, None, baseline, None)]
        source = FolderSource(str(root / "originals"))
        for encoding in args.encodings.split(","):
            out = str(root / encoding)
            started = time.process_time()
            write_dataset(source, out, WriteOptions(resolution=args.resolution, encoding=encoding,
                                                    jpeg_quality=args.jpeg_quality, progress=False))
            write_rate = args.num_images / (time.process_time() - started)
            stored = sum(f.stat().st_size for f in Path(out).glob("part-*/shard.*")) / args.num_images
            loader_rate = time_loader(out, args.workers) if args.workers else None
            rows.append((encoding, stored, write_rate, time_shards(out), loader_rate))

    cpu = os.cpu_count()
    print(f"\n{args.num_images} images, {SOURCE_SIZE[0]}x{SOURCE_SIZE[1]} JPEG originals -> {args.resolution} px; "
          f"rates per CPU second of one thread ({cpu} CPU cores on this machine)")
    header = f"{'encoding':<26} {'KB/image':>9} {'write img/s':>12} {'read img/s/core':>16} {'vs baseline':>12}"
    if args.workers:
        header += f" {f'{args.workers}-worker img/s':>16}"
    print(header)
    for name, size, write_rate, read_rate, loader_rate in rows:
        line = (f"{name:<26} {size / 1024:>9.1f} {'' if write_rate is None else f'{write_rate:,.0f}':>12} "
                f"{read_rate:>16,.0f} {read_rate / baseline:>11.1f}x")
        if args.workers:
            line += f" {'' if loader_rate is None else f'{loader_rate:,.0f}':>16}"
        print(line)


if __name__ == "__main__":
    main()
