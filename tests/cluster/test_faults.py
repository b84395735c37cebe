"""Faults across hosts, under the real two-node Slurm cluster of conftest.slurm_hosts (one slurmd per host
namespace), each ending in a resumed run equal to the uninterrupted reference job (same losses at every step,
bitwise equal weights).

One run lives through three faults (its ranks talk on the fabric, GLOO_SOCKET_IFNAME=eth1):
  0. node 1's rank crashes (SIGSEGV): node 0's rank exits 76, node 1's launcher reports 139, and train.sh
     fails the job without a requeue (a bug would crash again); the same command submitted again resumes;
  1. the composer launcher of node 1 is killed (SIGKILL): its rank dies with it (PR_SET_PDEATHSIG), node 0's
     rank sees the connection close and exits 76, and train.sh requeues the job;
  2. the fabric is partitioned, silently, while Slurm's own network stays up: both ranks give up after
     train.dist_timeout (30 s) with 76, train.sh requeues; the partition healed, the next run completes.
Another job loses node 1 entirely (links down, every process on it killed, slurmd included): Slurm declares
the node DOWN (SlurmdTimeout 10 s) and requeues the job itself, which train.sh's log says; the node comes
back and the job resumes.

Measured on 2 CPU cores shared with other work (load average 5-7), two runs: launcher killed -> its rank
gone 0.6 s later, the job requeued by train.sh 3.6-4.0 s after the kill; partition -> requeued 34.6-35.4 s
after it (dist_timeout 30 s); node death -> requeued by Slurm 28.5-31.8 s after it (SlurmdTimeout 10 s and its
ping cycle).
"""

from __future__ import annotations

import re
import signal
import time

import psutil
import pytest
import torch

from tests.cluster.conftest import FINAL, TRAIN_STEPS, model_tensors, submit_train
from tests.cluster.test_train import losses

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

JOB_TIMEOUT = 600
DIST_TIMEOUT = 30


def processes(hosts, node: int, *needles: str) -> list[psutil.Process]:
    """Processes on host `node` whose command line holds every needle."""
    found = []
    for pid in hosts.pids(node):
        try:
            cmdline = " ".join(psutil.Process(pid).cmdline())
        except psutil.NoSuchProcess:
            continue
        if all(n in cmdline for n in needles):
            found.append(psutil.Process(pid))
    return found


def assert_equals_reference(job, reference_job) -> None:
    assert reference_job.cluster.wait(reference_job.job_id, timeout=JOB_TIMEOUT)["JobState"] == "COMPLETED"
    assert losses(job.run_dir) == losses(reference_job.run_dir)
    ours, reference = model_tensors(job.checkpoint(TRAIN_STEPS)), model_tensors(reference_job.checkpoint(TRAIN_STEPS))
    assert ours.keys() == reference.keys()
    different = [k for k in ours if not torch.equal(ours[k], reference[k])]
    assert not different, f"tensors differ after the faults: {different[:5]}"


def node_processes(job, node: int):
    """(launcher, ranks) of the job's current run on host `node`."""
    hosts = job.cluster.hosts
    launcher = processes(hosts, node, "composer.cli", f"{job.name}-{job.job_id}/restart-")  # its --stdout
    ranks = [p for p in processes(hosts, node, "-m dip_scale.train", str(job.save_folder)) if p not in launcher]
    assert len(launcher) == 1 and len(ranks) == 1, (launcher, ranks, job.log_text())
    return launcher[0], ranks


@pytest.fixture(scope="module")
def faults(slurm_hosts, shards, tmp_path_factory, reference_job):
    """A crash, then a dead launcher and a partition (module doc), driven to the end of the run; returns the
    crashed job, the job that resumed it and finished, and timings (s)."""
    slurm, hosts = slurm_hosts, slurm_hosts.hosts
    workdir = tmp_path_factory.mktemp("faults")
    options = {"sbatch_args": ["--nodes=2"], "overrides": [f"train.dist_timeout={DIST_TIMEOUT}"],
               "env": {"GLOO_SOCKET_IFNAME": "eth1"}}
    took = {}

    # 0. node 1's rank crashes (SIGSEGV), past the first checkpoint (step 4): the job fails for good
    crashed = submit_train(slurm, workdir, shards, "crash", **options)
    crashed.wait_steps(5, timeout=JOB_TIMEOUT)
    node_processes(crashed, 1)[1][0].send_signal(signal.SIGSEGV)
    crashed_final = slurm.wait(crashed.job_id, timeout=JOB_TIMEOUT)

    # The same command again continues the run, from step 4.
    job = submit_train(slurm, workdir, shards, "flt", **options)

    # 1. node 1's launcher dies, past the next checkpoint (step 8)
    job.wait_steps(5, timeout=JOB_TIMEOUT)
    launcher, ranks = node_processes(job, 1)
    killed = time.monotonic()
    launcher.send_signal(signal.SIGKILL)
    while any(r.is_running() and r.status() != psutil.STATUS_ZOMBIE for r in ranks):
        assert time.monotonic() - killed < 30, "the rank outlived its launcher"
        time.sleep(0.02)
    took["ranks_gone"] = time.monotonic() - killed
    took["launcher_requeue"] = job.wait_log(f"requeueing job {job.job_id} (restart 1 ") + took["ranks_gone"]

    # 2. the fabric partitions, once the next run (from step 8) is past its first checkpoint (step 12)
    job.wait_steps(5, timeout=JOB_TIMEOUT)
    hosts.partition("eth1")
    try:
        partitioned = time.monotonic()
        job.wait_log(f"requeueing job {job.job_id} (restart 2 ", timeout=DIST_TIMEOUT + 120)
        took["partition_requeue"] = time.monotonic() - partitioned
    finally:
        hosts.heal("eth1")

    final = slurm.wait(job.job_id, timeout=JOB_TIMEOUT, on_poll=slurm.release_requeued)
    print("fault timings (s):", {k: round(v, 1) for k, v in took.items()})
    return (crashed, crashed_final), (job, final), took


def test_a_crashed_rank_fails_the_job_without_a_requeue(faults):
    (job, final), _, _ = faults
    log = job.log_text()
    assert final["JobState"] == "FAILED" and final["Restarts"] == "0", f"{final}\n{log}"
    assert final["ExitCode"] == "139:0", f"{final}\n{log}"
    # Node 0's rank only lost its peer (76); node 1's own failure decides.
    assert "node exit statuses: node 0: 76, node 1: 139" in log, log
    assert "training failed with exit status 139" in log and "not requeued" in log


def test_a_dead_launcher_takes_its_ranks_and_the_job_is_requeued_within_seconds(faults):
    _, (job, _), took = faults
    log = job.log_text()
    assert took["ranks_gone"] < 5, took  # the kernel kills them with the launcher
    assert took["launcher_requeue"] < 30, took  # measured 4-8 s; the launcher's cleanup waits up to 30 s
    first = log.split("restart 1 (max")[0]
    assert "node exit statuses: node 0: 76, node 1: none (srun:" in first, first
    assert "lost contact with other ranks" in first
    assert "the ranks lost contact with each other (exit 76" in first


def test_a_partition_ends_within_dist_timeout_and_the_job_is_requeued(faults):
    _, (job, _), took = faults
    log = job.log_text()
    assert took["partition_requeue"] < DIST_TIMEOUT + 30, took  # measured dist_timeout + 5-6 s
    second = log.split("restart 1 (max")[1].split("restart 2 (max")[0]
    assert "node exit statuses: node 0: 76, node 1: 76 (srun: 76)" in second, second
    assert f"Timed out waiting {DIST_TIMEOUT * 1000}ms" in second


def test_after_the_faults_the_run_equals_the_uninterrupted_one(faults, reference_job):
    _, (job, final), _ = faults
    log = job.log_text()
    assert final["JobState"] == "COMPLETED" and final["Restarts"] == "2", f"{final}\n{log}"
    # each node's first rank prints it
    assert re.findall(r"resuming dip-tiny-cpu from step (\d+)", log) == ["4", "4", "8", "8", "12", "12"], log
    assert f"complete at step {TRAIN_STEPS}" in log and "training complete" in log
    assert_equals_reference(job, reference_job)


def test_node_death_slurm_requeues_and_the_run_resumes(slurm_hosts, shards, tmp_path, reference_job):
    slurm = slurm_hosts
    slurm.wait_idle()  # nothing else may run on the node that dies (the other jobs of this module are done)
    job = submit_train(slurm, tmp_path, shards, "dth", sbatch_args=["--nodes=2"])
    job.wait_steps(5, timeout=JOB_TIMEOUT)  # past the first checkpoint (step 4)
    died = time.monotonic()
    slurm.kill_node(1)
    try:
        state = slurm.wait(job.job_id, until=lambda j: j.get("Restarts") == "1" or j.get("JobState") in FINAL,
                           timeout=300)
        requeued = time.monotonic() - died
        assert state.get("Restarts") == "1", state
        assert slurm.node_state("node1") == "down", slurm.node_state("node1")
    finally:
        slurm.revive_node(1)
    final = slurm.wait(job.job_id, timeout=JOB_TIMEOUT, on_poll=slurm.release_requeued)
    log = job.log_text()
    assert final["JobState"] == "COMPLETED" and final["Restarts"] == "1", f"{final}\n{log}"
    # Slurm's timeout (10 s) and ping cycle: measured 28.5-31.8 s; its default SlurmdTimeout is 300 s.
    print(f"node death: requeued by Slurm {requeued:.1f}s after it")
    assert requeued < 90, requeued
    first = log.split("restart 1 (max")[0]
    assert "Node failure on node1" in first, first
    assert "received SIGTERM: Slurm is ending the job; Slurm has requeued the job itself (restart 1" in first, first
    assert "not requeued" not in first
    assert "resuming dip-tiny-cpu from step 4" in log.split("restart 1 (max")[1]
    assert_equals_reference(job, reference_job)
