"""Join the parts of a finished write into one dataset: index.json, dataset.json and skipped.jsonl.

Run once after all tasks of a write are done (`dip-prep write` with one task does it itself). It refuses
to merge while any chunk of the plan is incomplete, so a merged dataset never silently lacks a part.
Shards stay where the tasks wrote them; the merged index names them by part (`part-00003/shard.00000.mds`),
in chunk order, so sample indices follow the source order whatever the number of tasks or workers.
Merging again is harmless and gives the same files.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from typing import Any

from data_prep.errors import PrepError
from data_prep.parts import describe_chunks, done_chunks, missing_chunks, read_part_indexes, read_results, require_plan
from dip_scale import __version__
from dip_scale.data.layout import DATASET_FORMAT, DATASET_INFO_FILE, INDEX_FILE, SKIPPED_FILE, part_name
from dip_scale.storage import open_store


@dataclass(frozen=True)
class MergeSummary:
    out: str
    num_samples: int
    num_skipped: int
    num_problems: int
    num_shards: int
    bytes: int

    def format(self) -> str:
        return (f"merged {self.out}: {self.num_samples:,} samples in {self.num_shards:,} shards "
                f"({self.bytes / 1e6:,.1f} MB); {self.num_skipped:,} inputs skipped, "
                f"{self.num_problems:,} source problems (see {self.out}/{SKIPPED_FILE})")


def prefixed_shard(shard: dict[str, Any], part: str) -> dict[str, Any]:
    """A part's shard entry as the merged index lists it: file names relative to the dataset root."""
    shard = copy.deepcopy(shard)
    for key in ("raw_data", "zip_data", "raw_meta", "zip_meta"):
        if shard.get(key):
            shard[key]["basename"] = f"{part}/{shard[key]['basename']}"
    return shard


def merge_dataset(out_url: str) -> MergeSummary:
    """Merge the complete parts at `out_url` (local folder or s3:// URL)."""
    out = open_store(out_url)
    plan = require_plan(out)
    missing = missing_chunks(plan, done_chunks(out))
    if missing:
        raise PrepError(f"cannot merge {out.url}: chunk(s) {describe_chunks(missing)} of {plan.num_chunks} are not "
                        "complete. Rerun the write task(s) that own them (task index = chunk % num_tasks), "
                        "then merge again")
    chunks = list(range(plan.num_chunks))
    results = read_results(out, chunks)
    indexes = read_part_indexes(out, chunks)

    shards: list[dict[str, Any]] = []
    for chunk in chunks:
        part = part_name(chunk)
        part_shards = indexes[chunk].get("shards", [])
        samples = sum(int(shard["samples"]) for shard in part_shards)
        if samples != results[chunk].written:
            raise PrepError(f"{out.url_of(part)}: its {INDEX_FILE} holds {samples} samples but its completion "
                            f"record says {results[chunk].written}; delete the part folder and rerun the write")
        shards += [prefixed_shard(shard, part) for shard in part_shards]

    num_classes = len(plan.class_names)
    class_counts = [0] * num_classes
    for result in results.values():
        for label, count in result.class_counts.items():
            class_counts[label] += count
    skipped = [problem for result in results.values() for problem in result.skipped]
    num_samples = sum(result.written for result in results.values())
    total_bytes = sum(result.bytes for result in results.values())

    info = {
        "format": DATASET_FORMAT,
        "num_samples": num_samples,
        "num_skipped": len(skipped),
        "num_classes": num_classes,
        "class_names": plan.class_names,
        "synsets": plan.synsets,
        "class_counts": class_counts,
        "resolution": plan.resolution,
        "encoding": plan.encoding,
        "jpeg_quality": plan.jpeg_quality,
        "compression": plan.compression,
        "num_shards": len(shards),
        "bytes": total_bytes,
        "source": plan.source,
        "dip_scale_version": __version__,
    }
    lines = [json.dumps({**problem, "kind": "source"}) for problem in plan.problems]
    lines += [json.dumps({**problem.to_json(), "kind": "input"}) for problem in skipped]
    out.write_bytes(SKIPPED_FILE, "".join(line + "\n" for line in lines).encode())
    out.write_json(DATASET_INFO_FILE, info)
    # Last: readers take the presence of index.json to mean the dataset is complete.
    out.write_bytes(INDEX_FILE, json.dumps({"version": 2, "shards": shards}).encode())
    return MergeSummary(out=out.url, num_samples=num_samples, num_skipped=len(skipped),
                        num_problems=len(plan.problems), num_shards=len(shards), bytes=total_bytes)
