"""`dip-prep verify`: check a dataset end to end; any problem means a non-zero exit.

Checked, in order:
- dataset.json and index.json exist and agree (sample count, shard count, column encodings);
- when plan.json is there (datasets written by `dip-prep write`): every chunk is complete and the merged
  index is exactly the concatenation of the parts' indexes, with the sample counts their records give;
- every shard file: size and every stored hash (of the stored file, and of the raw file when compressed);
- every sample: the image decodes to resolution x resolution RGB, the label lies in [0, num_classes);
- per-class counts equal those in dataset.json.
Shards are checked in parallel worker processes, one shard at a time each (S3 shards are downloaded to a
temporary file and deleted after).
"""

from __future__ import annotations

import io
import os
import tempfile
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image
from streaming.base.compression import decompress
from streaming.base.format.mds import MDSReader
from streaming.base.hashing import get_hash
from tqdm import tqdm

from data_prep.merge import prefixed_shard
from data_prep.parts import describe_chunks, done_chunks, missing_chunks, read_part_indexes, read_plan, read_results
from data_prep.workers import worker_context
from dip_scale.data.layout import (
    DATASET_INFO_FILE,
    IMAGE_COLUMN,
    INDEX_FILE,
    LABEL_COLUMN,
    image_column_encoding,
    part_name,
    read_dataset_info,
)
from dip_scale.storage import Store, open_store


@dataclass
class VerifyReport:
    url: str
    num_samples: int = 0
    num_shards: int = 0
    bytes: int = 0
    samples_checked: int = 0
    shards_checked: int = 0
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems

    def format(self, limit: int = 20) -> str:
        verdict = "OK" if self.ok else f"FAILED: {len(self.problems):,} problem(s)"
        lines = [f"dip-prep verify {self.url}: {verdict}",
                 f"  shards   {self.shards_checked:,} of {self.num_shards:,} checked, {self.bytes / 1e6:,.1f} MB",
                 f"  samples  {self.samples_checked:,} of {self.num_samples:,} decoded",
                 f"  time     {self.seconds:,.1f} s"]
        lines += [f"  problem: {problem}" for problem in self.problems[:limit]]
        if len(self.problems) > limit:
            lines.append(f"  ... and {len(self.problems) - limit:,} more")
        return "\n".join(lines)


# -- one shard (runs in a worker) -------------------------------------------------------------------

@dataclass
class _ShardCheck:
    basename: str
    samples: int = 0
    bytes: int = 0
    class_counts: Counter = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)


def _check_hashes(name: str, data: bytes, info: dict[str, Any], problems: list[str]) -> None:
    if len(data) != info["bytes"]:
        problems.append(f"{name}: {len(data)} bytes, index says {info['bytes']}")
    for algo, expected in info.get("hashes", {}).items():
        actual = get_hash(algo, data)
        if actual != expected:
            problems.append(f"{name}: {algo} hash {actual} does not match the index ({expected})")


def _check_image(value: Any, encoding: str, resolution: int) -> str | None:
    """None if `value` is a valid decoded image column, else what is wrong."""
    if encoding == "raw":
        array = np.asarray(value)
    else:
        try:
            with (Image.open(io.BytesIO(value)) if isinstance(value, bytes) else value) as image:
                image.load()
                if image.mode != "RGB":
                    return f"image mode {image.mode}, expected RGB"
                array = np.asarray(image)
        except (OSError, SyntaxError, ValueError) as error:
            return f"image does not decode ({type(error).__name__}: {error})"
    if array.shape != (resolution, resolution, 3) or array.dtype != np.uint8:
        return f"image is {array.dtype} {array.shape}, expected uint8 {(resolution, resolution, 3)}"
    return None


def _check_shard(url: str, shard: dict[str, Any], encoding: str, resolution: int, num_classes: int) -> _ShardCheck:
    folder = open_store(url)
    stored = shard.get("zip_data") or shard["raw_data"]
    check = _ShardCheck(basename=shard["raw_data"]["basename"])
    name = folder.url_of(stored["basename"])
    with tempfile.TemporaryDirectory(prefix="dip-verify-") as temporary:
        local = os.path.join(temporary, "shard")
        try:
            folder.download(stored["basename"], local)
        except FileNotFoundError:
            check.problems.append(f"{name}: missing")
            return check
        with open(local, "rb") as file:
            data = file.read()
    check.bytes = len(data)
    _check_hashes(name, data, stored, check.problems)
    if shard.get("zip_data"):
        try:
            data = decompress(shard["compression"], data)
        except Exception as error:  # any codec failure means the same thing: a corrupt shard
            check.problems.append(f"{name}: does not decompress with {shard['compression']} ({error})")
            return check
        _check_hashes(f"{name} (decompressed)", data, shard["raw_data"], check.problems)
    if check.problems:
        return check  # decoding a file with wrong hashes would only repeat the finding

    reader = MDSReader.from_json("", None, shard)
    count = int(np.frombuffer(data[:4], np.uint32)[0])
    if count != shard["samples"]:
        check.problems.append(f"{name}: holds {count} samples, index says {shard['samples']}")
        return check
    offsets = np.frombuffer(data[4:4 + 4 * (count + 1)], np.uint32)
    for index in range(count):
        where = f"{name} sample {index}"
        try:
            sample = reader.decode_sample(data[offsets[index]:offsets[index + 1]])
        except Exception as error:  # a malformed record can fail anywhere in Streaming's decoders
            check.problems.append(f"{where}: does not decode ({type(error).__name__}: {error})")
            continue
        problem = _check_image(sample[IMAGE_COLUMN], encoding, resolution)
        if problem:
            check.problems.append(f"{where}: {problem}")
        label = sample[LABEL_COLUMN]
        if not isinstance(label, (int, np.integer)) or not 0 <= int(label) < num_classes:
            check.problems.append(f"{where}: label {label!r} is not in [0, {num_classes})")
        else:
            check.class_counts[int(label)] += 1
        check.samples += 1
    return check


# -- the dataset ------------------------------------------------------------------------------------

def _check_structure(folder: Store, info: dict[str, Any], index: dict[str, Any], report: VerifyReport) -> None:
    shards = index.get("shards", [])
    report.num_shards = len(shards)
    report.num_samples = sum(int(shard.get("samples", 0)) for shard in shards)
    if report.num_samples != info["num_samples"]:
        report.problems.append(f"{INDEX_FILE} holds {report.num_samples} samples, {DATASET_INFO_FILE} says "
                               f"{info['num_samples']}")
    if info.get("num_shards") is not None and len(shards) != info["num_shards"]:
        report.problems.append(f"{INDEX_FILE} lists {len(shards)} shards, {DATASET_INFO_FILE} says "
                               f"{info['num_shards']}")
    expected_columns = {IMAGE_COLUMN: image_column_encoding(info["encoding"], info["resolution"]), LABEL_COLUMN: "int"}
    for shard in shards:
        columns = dict(zip(shard.get("column_names", []), shard.get("column_encodings", [])))
        if shard.get("format") != "mds" or columns != expected_columns:
            report.problems.append(f"shard {shard.get('raw_data', {}).get('basename')}: format/columns "
                                   f"{shard.get('format')} {columns}, expected mds {expected_columns}")

    plan = read_plan(folder)
    if plan is None:
        return
    missing = missing_chunks(plan, done_chunks(folder))
    if missing:
        report.problems.append(f"chunk(s) {describe_chunks(missing)} of {plan.num_chunks} are incomplete")
        return
    chunks = list(range(plan.num_chunks))
    results = read_results(folder, chunks)
    recorded = sum(result.written for result in results.values())
    if recorded != info["num_samples"]:
        report.problems.append(f"the parts' completion records count {recorded} samples, {DATASET_INFO_FILE} "
                               f"says {info['num_samples']}")
    indexes = read_part_indexes(folder, chunks)
    expected = [prefixed_shard(s, part_name(c)) for c in chunks for s in indexes[c].get("shards", [])]
    if expected != shards:
        report.problems.append(f"{INDEX_FILE} is not the merge of the parts' indexes: "
                               f"run `dip-prep merge {folder.url}`")


def verify_dataset(url: str, num_workers: int = 1, progress: bool = True) -> VerifyReport:
    """Check the dataset at `url` (local folder or s3:// URL); see the module docstring."""
    started = time.perf_counter()
    folder = open_store(url)
    report = VerifyReport(url=folder.url)
    try:
        info = read_dataset_info(folder.url)
        index = folder.read_json(INDEX_FILE)
    except (FileNotFoundError, ValueError) as error:
        report.problems.append(str(error))
        report.seconds = time.perf_counter() - started
        return report
    _check_structure(folder, info, index, report)

    shards = index.get("shards", [])
    args = (folder.url, info["encoding"], info["resolution"], info["num_classes"])
    class_counts: Counter = Counter()
    with tqdm(total=len(shards), desc="verify", unit="shard", disable=not progress) as bar:
        if num_workers == 1:
            checks = (_check_shard(args[0], shard, *args[1:]) for shard in shards)
            for check in checks:
                _add(report, class_counts, check)
                bar.update()
        else:
            with ProcessPoolExecutor(num_workers, mp_context=worker_context()) as pool:
                futures = [pool.submit(_check_shard, args[0], shard, *args[1:]) for shard in shards]
                for future in as_completed(futures):
                    _add(report, class_counts, future.result())
                    bar.update()

    expected_counts = info.get("class_counts")
    if expected_counts is not None and report.shards_checked == len(shards):
        actual = [class_counts.get(label, 0) for label in range(info["num_classes"])]
        if actual != expected_counts:
            wrong = [label for label in range(info["num_classes"]) if actual[label] != expected_counts[label]]
            report.problems.append(f"class counts differ from {DATASET_INFO_FILE} for labels {wrong[:10]}")
    report.seconds = time.perf_counter() - started
    return report


def _add(report: VerifyReport, class_counts: Counter, check: _ShardCheck) -> None:
    report.shards_checked += 1
    report.samples_checked += check.samples
    report.bytes += check.bytes
    report.problems += check.problems
    class_counts.update(check.class_counts)
