"""Write one chunk: load, crop and encode its items into a fresh part folder, then mark it complete.

The unit of crash safety. A part folder counts only once its done.json exists, and done.json is written
after every shard of the part and then the part's index.json are in place. A chunk found without it is
the remains of a crash: it is deleted and written again from scratch, so a rerun neither duplicates nor
drops an image. Runs in a worker process; everything it receives is small and picklable.
"""

from __future__ import annotations

import io
import os
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image
from streaming import MDSWriter

from data_prep.errors import PrepError
from data_prep.sources.base import BadInput, Item, ItemLoader, Problem
from dip_scale.data.layout import DONE_FILE, IMAGE_COLUMN, INDEX_FILE, LABEL_COLUMN, image_column_encoding, part_name
from dip_scale.storage import is_remote, open_store

SHARD_HASHES = ["sha1", "xxh3_64"]
"""Stored per shard file: sha1 for `verify`, xxh3_64 as a fast choice for Streaming's validate_hash."""

PNG_COMPRESS_LEVEL = 3
"""zlib level for PNG: about twice as fast to write as PIL's default 6, at the same size or smaller."""


def encode_image(array: np.ndarray, encoding: str, jpeg_quality: int | None) -> bytes | np.ndarray:
    """The value stored in the image column: encoded bytes (Streaming stores bytes as given) or the array."""
    if encoding == "raw":
        return array
    buffer = io.BytesIO()
    if encoding == "jpeg":
        # 4:4:4 chroma: subsampling would discard the colour detail that a pixel-space model must learn.
        Image.fromarray(array).save(buffer, format="JPEG", quality=jpeg_quality, subsampling=0)
    elif encoding == "png":
        Image.fromarray(array).save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    else:
        raise ValueError(f"unknown image encoding {encoding!r}")
    return buffer.getvalue()


def _fsync(path: str) -> None:
    with open(path, "rb") as file:
        os.fsync(file.fileno())


@dataclass(frozen=True)
class ChunkJob:
    chunk: int
    items: list[Item]
    loader: ItemLoader
    out_url: str
    resolution: int
    encoding: str
    jpeg_quality: int | None
    compression: str | None
    shard_size_limit: int
    strict: bool


@dataclass
class ChunkResult:
    """What done.json records about a complete chunk."""

    chunk: int
    written: int
    skipped: list[Problem] = field(default_factory=list)
    bytes: int = 0
    shards: int = 0
    class_counts: dict[int, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"chunk": self.chunk, "written": self.written, "skipped": [p.to_json() for p in self.skipped],
                "bytes": self.bytes, "shards": self.shards,
                "class_counts": {str(label): count for label, count in sorted(self.class_counts.items())}}

    @classmethod
    def from_json(cls, obj: dict[str, Any], where: str) -> ChunkResult:
        try:
            return cls(chunk=int(obj["chunk"]), written=int(obj["written"]),
                       skipped=[Problem(p["key"], p["reason"], p.get("label")) for p in obj["skipped"]],
                       bytes=int(obj["bytes"]), shards=int(obj["shards"]),
                       class_counts={int(k): int(v) for k, v in obj["class_counts"].items()})
        except (KeyError, TypeError, ValueError) as error:
            raise PrepError(f"{where}: malformed completion record ({type(error).__name__}: {error})") from None


def write_chunk(job: ChunkJob, progress: Callable[[int], None]) -> ChunkResult:
    """Write chunk `job.chunk` into `<out>/part-NNNNN/`; `progress(n)` is called as items are done."""
    out = open_store(job.out_url)
    part = part_name(job.chunk)
    out.delete_tree(part)  # the remains of an interrupted attempt, if any
    columns = {IMAGE_COLUMN: image_column_encoding(job.encoding, job.resolution), LABEL_COLUMN: "int"}
    result = ChunkResult(chunk=job.chunk, written=0)
    counts: Counter[int] = Counter()
    expected_shape = (job.resolution, job.resolution, 3)

    with tempfile.TemporaryDirectory(prefix="dip-prep-") as staging:
        # S3: stage the part locally, then upload it with this process's one S3 client (Streaming's
        # uploader builds a new boto3 session per writer, which costs more than writing a small chunk).
        local_part = os.path.join(staging, part) if is_remote(out.url) else out.url_of(part)
        writer = MDSWriter(out=local_part, columns=columns, compression=job.compression, hashes=SHARD_HASHES,
                           size_limit=job.shard_size_limit)
        done_since_report = 0
        for item in job.items:
            try:
                array = job.loader.load(item, job.resolution)
            except BadInput as error:
                if job.strict:
                    raise PrepError(f"bad input {item.key!r} (label {item.label}): {error} "
                                    "(--strict; without it, bad inputs are skipped and reported)") from None
                result.skipped.append(Problem(item.key, str(error), item.label))
            else:
                if array.shape != expected_shape or array.dtype != np.uint8:
                    raise RuntimeError(f"loader returned {array.dtype} {array.shape} for {item.key!r}, "
                                       f"expected uint8 {expected_shape}")
                writer.write({IMAGE_COLUMN: encode_image(array, job.encoding, job.jpeg_quality),
                              LABEL_COLUMN: item.label})
                result.written += 1
                counts[item.label] += 1
            done_since_report += 1
            if done_since_report >= 16:
                progress(done_since_report)
                done_since_report = 0
        # An exception above leaves the part without done.json: a rerun deletes and redoes it.
        writer.finish()  # flushes the last shard and writes the part's index.json
        stored_files = [(shard["zip_data"] or shard["raw_data"])["basename"] for shard in writer.shards]
        if is_remote(out.url):
            # Shards first, the part's index after them, done.json (below) last.
            for name in [*stored_files, INDEX_FILE]:
                out.upload(os.path.join(local_part, name), f"{part}/{name}")
        else:
            for name in [*stored_files, INDEX_FILE]:
                _fsync(os.path.join(local_part, name))  # on disk before done.json claims they are
        progress(done_since_report)

    for shard in writer.shards:
        stored = shard["zip_data"] or shard["raw_data"]
        result.bytes += int(stored["bytes"])
    result.shards = len(writer.shards)
    result.class_counts = dict(counts)
    out.write_json(f"{part}/{DONE_FILE}", result.to_json())
    return result
