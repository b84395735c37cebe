"""cluster/prep_data.sh under a real Slurm: an array job shards the synthetic dataset across tasks, a job
that depends on all of them merges the parts and verifies the result; a failed write never merges."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from tests.cluster.conftest import FINAL, REPO, venv_env

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

PREP = REPO / "cluster" / "prep_data.sh"


def submit(slurm, workdir, *args, tasks: int):
    r = subprocess.run(["bash", str(PREP), *args], cwd=workdir, capture_output=True, text=True,
                       env={**slurm.env, **venv_env(), "TASKS": str(tasks), "CPUS_PER_TASK": "1"})
    assert r.returncode == 0, r.stdout + r.stderr
    found = re.search(r"array job (\d+) \((\d+) tasks\).* merge job (\d+)", r.stdout)
    assert found, r.stdout
    return int(found.group(1)), int(found.group(3))


def wait_array(slurm, array_id: int, tasks: int, timeout: float = 300) -> list[dict]:
    done = lambda: [j for j in slurm.array_jobs(array_id) if j.get("JobState") in FINAL]  # noqa: E731
    slurm.wait(array_id, until=lambda _: len(done()) == tasks, timeout=timeout)
    return sorted(done(), key=lambda j: int(j["ArrayTaskId"]))


def test_array_job_shards_and_dependent_job_merges(slurm, tmp_path):
    out = tmp_path / "synthetic-32"
    array_id, merge_id = submit(slurm, tmp_path, "synthetic", str(out), "--num-images", "100", "--resolution", "32",
                                "--encoding", "png", "--chunk-size", "16", tasks=3)
    tasks = wait_array(slurm, array_id, 3)
    assert [t["JobState"] for t in tasks] == ["COMPLETED"] * 3, tasks
    merged = slurm.wait(merge_id)
    merge_log = (tmp_path / f"dip-prep-merge-{merge_id}.out").read_text()
    assert merged["JobState"] == "COMPLETED", f"{merged}\n{merge_log}"

    # Every task wrote its own share of the 7 chunks (3 + 2 + 2) ...
    for i, share in enumerate((3, 2, 2)):
        log = (tmp_path / f"dip-prep-{array_id}_{i}.out").read_text()
        assert f"task {i} of 3" in log and f"chunks      {share} written now" in log, log
    # ... and the merge job joined them into one dataset that verifies.
    assert "merged" in merge_log and ": OK" in merge_log, merge_log
    index = json.loads((out / "index.json").read_text())
    assert sum(shard["samples"] for shard in index["shards"]) == 100
    check = subprocess.run([sys.executable, "-m", "data_prep", "verify", str(out), "--no-progress"],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


def test_failed_write_cancels_the_merge(slurm, tmp_path):
    array_id, merge_id = submit(slurm, tmp_path, "synthetic", str(tmp_path / "out"), "--num-images", "10",
                                "--encoding", "no-such-encoding", tasks=2)
    tasks = wait_array(slurm, array_id, 2)
    assert [t["JobState"] for t in tasks] == ["FAILED"] * 2, tasks
    merged = slurm.wait(merge_id)
    assert merged["JobState"] == "CANCELLED", merged
    assert not (tmp_path / "out" / "index.json").exists()
