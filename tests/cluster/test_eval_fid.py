"""cluster/eval_fid.sh under a real Slurm: a job evaluates one checkpoint of a training job on its own
allocation and writes the results file and the run's table."""

from __future__ import annotations

import json
import math

import pytest

from tests.cluster.conftest import REPO, TRAIN_STEPS, venv_env
from tests.eval.conftest import make_test_inception_weights

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

EVAL = REPO / "cluster" / "eval_fid.sh"


def test_eval_job_writes_results(slurm, reference_job, tmp_path):
    from data_prep.synthetic import write_synthetic_shards

    reference = tmp_path / "reference"
    write_synthetic_shards(str(reference), num_images=10, resolution=32, seed=1)
    weights = tmp_path / "inception.pth"
    make_test_inception_weights(weights)
    trained = reference_job.cluster.wait(reference_job.job_id, timeout=300)
    assert trained["JobState"] == "COMPLETED", trained
    checkpoint = reference_job.checkpoint(TRAIN_STEPS)
    results = tmp_path / "results.json"

    job_id = slurm.sbatch("--gpus-per-node=0", str(EVAL), str(checkpoint), "--reference", str(reference),
                          "--num-samples", "10", "--batch-size", "10", "--steps", "2", "--num-workers", "0",
                          "--inception-weights", str(weights), "--out", str(results), cwd=tmp_path, env=venv_env())
    final = slurm.wait(job_id, timeout=300)
    log = (tmp_path / f"dip-eval-{job_id}.out").read_text()
    assert final["JobState"] == "COMPLETED", f"{final}\n{log}"
    record = json.loads(results.read_text())
    assert math.isfinite(record["metrics"]["fid"]), record
    assert record["num_samples"] == 10 and record["step"] == TRAIN_STEPS
    assert (reference_job.run_dir / "eval" / "results.csv").is_file()
