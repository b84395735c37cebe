"""The plan of a write: what is written (source, classes, resolution, encoding) cut into fixed chunks.

Every task of a (possibly multi-machine) write computes the same plan from the same command and stores
it as plan.json in the output; a rerun, another task, or `merge` reads it back. A rerun whose plan
differs (another resolution, a source tree that changed) is refused instead of mixing two datasets.
Chunk c holds source items [c * chunk_size, (c + 1) * chunk_size); task t of n owns chunks t, t + n, ...
(interleaved, so that tasks over a class-sorted source get similar work).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from data_prep.errors import PrepError

PLAN_FORMAT = "dip_scale.plan/1"

_INFORMATIONAL_KEYS = ("source_root",)
"""Plan keys that may differ between reruns: the same tree may be mounted elsewhere on another machine."""


@dataclass(frozen=True)
class Plan:
    source: dict[str, Any]
    """The source's description (kind, item count, listing hash, seed, ...)."""
    class_names: list[str]
    synsets: list[str] | None
    problems: list[dict[str, Any]]
    """Defects found while listing the source (empty class folders, stray files)."""
    resolution: int
    encoding: str
    jpeg_quality: int | None
    """JPEG quality (1-100) when encoding is jpeg, else None."""
    compression: str | None
    """Shard compression (Streaming's names: zstd, zstd:7, gz, br, ...), or None."""
    chunk_size: int
    shard_size_limit: int
    """Streaming's size_limit: bytes per shard before a new one starts."""
    source_root: str | None = None
    format: str = PLAN_FORMAT

    @property
    def num_items(self) -> int:
        return int(self.source["num_items"])

    @property
    def num_chunks(self) -> int:
        return -(-self.num_items // self.chunk_size)

    def chunk_range(self, chunk: int) -> tuple[int, int]:
        start = chunk * self.chunk_size
        return start, min(start + self.chunk_size, self.num_items)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, obj: Mapping[str, Any], where: str) -> Plan:
        if obj.get("format") != PLAN_FORMAT:
            raise PrepError(f"{where}: format {obj.get('format')!r} is not {PLAN_FORMAT!r}")
        names = {field.name for field in dataclasses.fields(cls)}
        unknown, missing = set(obj) - names, names - set(obj)
        if unknown or missing:
            raise PrepError(f"{where}: unknown keys {sorted(unknown)}, missing keys {sorted(missing)}")
        return cls(**obj)

    def differences(self, other: Plan) -> list[str]:
        """Human-readable differences that matter (informational keys excluded)."""
        mine, theirs = self.to_json(), other.to_json()
        found = []
        for key in mine:
            if key not in _INFORMATIONAL_KEYS and mine[key] != theirs[key]:
                found.append(f"{key}: {_short(theirs[key])} there, {_short(mine[key])} now")
        return found


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def chunks_of_task(num_chunks: int, task_index: int, num_tasks: int) -> list[int]:
    return list(range(task_index, num_chunks, num_tasks))


def resolve_task(task_index: int | None, num_tasks: int | None,
                 environ: Mapping[str, str] = os.environ) -> tuple[int, int]:
    """(task index, task count) from the flags, else from a Slurm array job's environment, else (0, 1).

    Slurm arrays need not start at 0 (`--array=1-8`): the index is SLURM_ARRAY_TASK_ID minus
    SLURM_ARRAY_TASK_MIN, and the count SLURM_ARRAY_TASK_COUNT; arrays with a step are refused.
    """
    if (task_index is None) != (num_tasks is None):
        raise PrepError("give both --task-index and --num-tasks, or neither")
    if task_index is None and "SLURM_ARRAY_TASK_ID" in environ:
        try:
            step = int(environ.get("SLURM_ARRAY_TASK_STEP", "1"))
            first = int(environ.get("SLURM_ARRAY_TASK_MIN", "0"))
            task_index = int(environ["SLURM_ARRAY_TASK_ID"]) - first
            num_tasks = int(environ["SLURM_ARRAY_TASK_COUNT"])
        except (KeyError, ValueError) as error:
            raise PrepError(f"cannot read the Slurm array task from the environment ({error}); "
                            "pass --task-index and --num-tasks") from None
        if step != 1:
            raise PrepError(f"Slurm array with step {step}: use a contiguous array (--array=0-N) "
                            "or pass --task-index and --num-tasks")
    if task_index is None or num_tasks is None:
        return 0, 1
    if num_tasks < 1 or not 0 <= task_index < num_tasks:
        raise PrepError(f"task index {task_index} is not in [0, {num_tasks}) (num_tasks={num_tasks})")
    return task_index, num_tasks
