"""cluster/train.sh under a real Slurm (tests/cluster/conftest.py): a job on two nodes (`sbatch --nodes=2`, one
slurmd per host namespace) completes; a two-node job warned of its preemption checkpoints, requeues itself,
resumes and ends with the same weights as an uninterrupted one; a broken recipe fails once and is not requeued;
requeues stop at MAX_RESTARTS (both on the one-node cluster: they end before any node starts)."""

from __future__ import annotations

import json
import re
import threading
import time

import pytest
import torch

from tests.cluster.conftest import TRAIN_STEPS, model_tensors, submit_train

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

JOB_TIMEOUT = 300


def losses(run_dir) -> dict[int, float]:
    """step -> loss from metrics.jsonl; a resumed run's later lines win."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        out[record["step"]] = record["loss/train/total"]
    return out


@pytest.fixture(scope="module")
def preempted_job(slurm_hosts, shards, tmp_path_factory, reference_job):
    """A training job sent Slurm's preemption warning (SIGUSR1 to the batch shell) once it is training.

    A watcher thread sends the signal as soon as the first step is logged (the job may be queued behind
    others first), then releases the requeued job at once instead of after Slurm's 120 s BeginTime."""
    slurm = slurm_hosts
    job = submit_train(slurm, tmp_path_factory.mktemp("preempted"), shards, "pre", sbatch_args=["--nodes=2"])
    signalled = threading.Event()
    stop = threading.Event()

    def watch():
        metrics = job.run_dir / "metrics.jsonl"
        deadline = time.monotonic() + JOB_TIMEOUT
        while not signalled.is_set() and time.monotonic() < deadline:
            if metrics.exists() and metrics.read_text().strip():  # the first step is done: the trainer listens
                slurm.scancel("--signal=USR1", "--batch", str(job.job_id))
                signalled.set()
            time.sleep(0.05)
        while not stop.is_set() and time.monotonic() < deadline:
            state = slurm.job(job.job_id)
            slurm.release_requeued(state)
            if state.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED"):
                return
            time.sleep(0.1)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    yield job, signalled
    stop.set()
    thread.join(timeout=10)


def test_train_job_completes(reference_job):
    job = reference_job
    final = job.cluster.wait(job.job_id, timeout=JOB_TIMEOUT)
    log = job.log_text()
    assert final["JobState"] == "COMPLETED", f"{final}\n{log}"
    assert final["ExitCode"] == "0:0" and final["Restarts"] == "0"
    assert final["NodeList"] == "node[0-1]" and "2 node(s) x 1 rank(s)" in log
    for node in (0, 1):  # each node's launcher reached the first node through the interface that routes there
        assert f"node {node} of 2 talks on GLOO_SOCKET_IFNAME=eth0" in log, log
        assert (job.workdir / "logs" / f"ref-{job.job_id}" / "restart-0" / f"node{node}.status").read_text() == "0\n"
    assert f"complete at step {TRAIN_STEPS}" in log and "training complete" in log
    assert (job.checkpoint(TRAIN_STEPS) / "manifest.json").is_file()
    assert sorted(losses(job.run_dir)) == list(range(1, TRAIN_STEPS + 1))
    # The per-job log folder holds the resolved recipe of each start.
    assert (job.workdir / "logs" / f"ref-{job.job_id}" / "restart-0" / "config.yaml").is_file()


def test_preempted_job_checkpoints_requeues_and_resumes_to_the_same_weights(slurm_hosts, reference_job, preempted_job):
    slurm = slurm_hosts
    job, signalled = preempted_job
    final = slurm.wait(job.job_id, timeout=JOB_TIMEOUT, on_poll=slurm.release_requeued)
    log = job.log_text()
    assert signalled.is_set(), "the job ended before it could be signalled"
    assert final["JobState"] == "COMPLETED", f"{final}\n{log}"
    assert final["Restarts"] == "1", f"expected exactly one requeue: {final}\n{log}"

    # Warned, the trainer checkpointed at the next step boundary and the job requeued itself ...
    assert "received SIGUSR1: asking the trainer to checkpoint and stop" in log, log
    stopped = re.search(r"preempted at step (\d+): checkpoint \S+ written", log)
    assert stopped, log
    step = int(stopped.group(1))
    assert 1 <= step < TRAIN_STEPS
    assert "training stopped for a requeue (exit 75)" in log
    assert f"requeueing job {job.job_id} (restart 1" in log
    # ... and the second start resumed from that checkpoint and finished the run.
    assert f"resuming dip-tiny-cpu from step {step} " in log, log
    assert f"complete at step {TRAIN_STEPS}" in log
    for restart in (0, 1):
        assert (job.workdir / "logs" / f"pre-{job.job_id}" / f"restart-{restart}" / "config.yaml").is_file()

    # Same losses at every step and bit-identical final weights as the uninterrupted run.
    assert slurm.wait(reference_job.job_id, timeout=JOB_TIMEOUT)["JobState"] == "COMPLETED"
    assert losses(job.run_dir) == losses(reference_job.run_dir)
    ours, reference = model_tensors(job.checkpoint(TRAIN_STEPS)), model_tensors(reference_job.checkpoint(TRAIN_STEPS))
    assert ours.keys() == reference.keys()
    different = [k for k in ours if not torch.equal(ours[k], reference[k])]
    assert not different, f"tensors differ after resume: {different[:5]}"


def test_broken_recipe_fails_once_and_is_not_requeued(slurm, shards, tmp_path):
    # Caught by the check before any node starts, and by the trainer itself on every rank.
    bad_key = submit_train(slurm, tmp_path / "bad-key", shards, "badkey", ["model.no_such_key=1"])
    no_data = submit_train(slurm, tmp_path / "no-data", shards, "nodata", [f"data.remote={tmp_path / 'missing'}"])
    for job, error in ((bad_key, "no_such_key"), (no_data, "no index.json")):
        final = slurm.wait(job.job_id, timeout=JOB_TIMEOUT)
        log = job.log_text()
        assert final["JobState"] == "FAILED" and final["ExitCode"] == "2:0", f"{final}\n{log}"
        assert re.search(r"error: .*" + re.escape(error), log), log
        assert "not requeued" in log
    time.sleep(2)  # a requeue would show by now
    for job in (bad_key, no_data):
        final = slurm.job(job.job_id)
        assert final["JobState"] == "FAILED" and final["Restarts"] == "0", final
        assert job.log_text().count("restart 0 (max") == 1


def test_requeue_stops_at_max_restarts(slurm, shards, tmp_path):
    # Warned before training starts (while the recipe is checked), with no restart left.
    job = submit_train(slurm, tmp_path / "max", shards, "maxrs", env={"MAX_RESTARTS": "0"})
    slurm.wait(job.job_id, until=lambda j: j.get("JobState") != "PENDING" and "restart 0 (max 0)" in job.log_text()
               or j.get("JobState") not in ("PENDING", "RUNNING"), timeout=JOB_TIMEOUT)
    slurm.scancel("--signal=USR1", "--batch", str(job.job_id))
    final = slurm.wait(job.job_id, timeout=JOB_TIMEOUT)
    log = job.log_text()
    assert "received SIGUSR1" in log, log
    assert "not requeueing: already restarted 0 times (MAX_RESTARTS=0)" in log, log
    assert final["JobState"] == "FAILED" and final["ExitCode"] == "75:0" and final["Restarts"] == "0", final
