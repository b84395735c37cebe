"""Plans: chunking, task assignment (flags or a Slurm array), and detecting a different rerun."""

from __future__ import annotations

import dataclasses

import pytest

from data_prep.errors import PrepError
from data_prep.plan import Plan, chunks_of_task, resolve_task


def _plan(**changes: object) -> Plan:
    plan = Plan(source={"kind": "synthetic", "num_items": 103, "seed": 0}, class_names=["a", "b"], synsets=None,
                problems=[], resolution=64, encoding="png", jpeg_quality=None, compression=None, chunk_size=10,
                shard_size_limit=1 << 26, source_root="/data/a")
    return dataclasses.replace(plan, **changes)


def test_chunks_cover_every_item_once() -> None:
    plan = _plan()
    assert plan.num_chunks == 11
    covered = [i for c in range(plan.num_chunks) for i in range(*plan.chunk_range(c))]
    assert covered == list(range(103))


@pytest.mark.parametrize("num_tasks", [1, 2, 3, 11, 20])
def test_tasks_partition_the_chunks(num_tasks: int) -> None:
    owned = [c for t in range(num_tasks) for c in chunks_of_task(11, t, num_tasks)]
    assert sorted(owned) == list(range(11))


def test_plan_round_trips_and_reports_differences() -> None:
    plan = _plan()
    assert Plan.from_json(plan.to_json(), "plan.json") == plan
    assert plan.differences(_plan(source_root="/mnt/elsewhere")) == []  # the tree may move
    assert plan.differences(_plan(resolution=32, encoding="jpeg")) == [
        "resolution: 32 there, 64 now", "encoding: 'jpeg' there, 'png' now"]


def test_plan_json_with_unknown_keys_is_rejected() -> None:
    with pytest.raises(PrepError, match=r"unknown keys \['extra'\]"):
        Plan.from_json({**_plan().to_json(), "extra": 1}, "s3://b/p/plan.json")


def test_resolve_task() -> None:
    assert resolve_task(None, None, {}) == (0, 1)
    assert resolve_task(2, 4, {"SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_COUNT": "8"}) == (2, 4)  # flags win
    slurm = {"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_MIN": "5", "SLURM_ARRAY_TASK_COUNT": "4"}
    assert resolve_task(None, None, slurm) == (2, 4)
    with pytest.raises(PrepError, match="with step 2"):
        resolve_task(None, None, {**slurm, "SLURM_ARRAY_TASK_STEP": "2"})
    with pytest.raises(PrepError, match="give both --task-index and --num-tasks"):
        resolve_task(1, None, {})
    with pytest.raises(PrepError, match=r"task index 4 is not in \[0, 4\)"):
        resolve_task(4, 4, {})
