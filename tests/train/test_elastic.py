"""Elastic resume: a run checkpointed on N ranks goes on with M ranks at the same global batch, and agrees
with the uninterrupted one-process run (the session's `straight_run`):
- the data: every step trains on the same samples (the global batch; their split over ranks follows the
  rank count), and each epoch on each sample once;
- the loss of every step and the final weights (EMA included) agree within float tolerance. Across rank
  counts the batch mean and the gradient are reduced in another order (one mean of 16 vs. the average of
  two means of 8), which changes the last bits: measured ~1e-7 relative in the loss and ~3e-8 absolute in
  the weights after 12 steps. Tolerances: rtol 1e-5 on the loss, atol 1e-5 on every weight (1% of one
  step of the learning rate, 1e-3). Same rank count, same segment: bitwise (checked in test_resume.py).

Two runs:
- 2 ranks -> 1 rank -> 2 ranks on one machine. The 2-rank segment is stopped as Slurm's time-limit warning
  does it: SIGUSR1 to one rank; the ranks agree, checkpoint together and exit 75.
- 1 rank -> 2 nodes of 1 rank, each node with a machine folder of its own (node 1's empty: it fetches from
  S3 the checkpoint that rank 0 chose).
"""

from __future__ import annotations

import random
import re
import signal
from pathlib import Path

import pytest

from tests.train.launch import final_model, free_port
from tests.train.runs import (
    EVERY,
    RUN_NAME,
    STEPS,
    assert_each_epoch_once,
    data_args,
    losses,
    own_shm_possible,
    run,
    samples_by_step,
    start,
)
from tests.train.test_resume import EXIT_PREEMPTED, resumed_from

pytestmark = pytest.mark.slow

LOSS_RTOL = 1e-5
WEIGHT_ATOL = 1e-5


def preempted_at(log: str) -> int:
    return int(re.search(r"preempted at step (\d+)", log).group(1))


def assert_matches_straight(straight: Path, *run_dirs: Path) -> None:
    seen, expected = samples_by_step(*run_dirs), samples_by_step(straight)
    assert_each_epoch_once(seen, STEPS)
    assert {s: sorted(ids) for s, ids in seen.items()} == {s: sorted(ids) for s, ids in expected.items()}
    got, want = losses(*run_dirs), losses(straight)
    assert got.keys() == want.keys()
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=LOSS_RTOL), f"step {step}"
    final, reference = final_model(run_dirs[0], STEPS), final_model(straight, STEPS)
    assert final.keys() == reference.keys()
    gap = max((final[k] - reference[k]).abs().max().item() for k in final)
    assert gap <= WEIGHT_ATOL, f"largest weight difference {gap}"


def test_two_ranks_one_rank_two_ranks(tmp_path, epoch_shards, straight_run):
    rng = random.Random()
    args = data_args(epoch_shards, tmp_path / "ckpt")
    run_dir = tmp_path / "ckpt" / RUN_NAME

    two = start(tmp_path / "a", args, run_dir, nproc=2)
    two.wait_step(rng.randint(2, EVERY))
    two.signal(signal.SIGUSR1, ranks=[1])  # one rank hears it; both checkpoint
    assert two.wait() == EXIT_PREEMPTED, two.log()
    first_stop = preempted_at(two.log())

    one = start(tmp_path / "b", args, run_dir)
    one.wait_step(rng.randint(first_stop + 2, STEPS - 3))
    one.signal(signal.SIGTERM)
    assert one.wait() == EXIT_PREEMPTED, one.log()
    assert resumed_from(one.log()) == first_stop
    second_stop = preempted_at(one.log())

    again = run(tmp_path / "c", args, run_dir, nproc=2)
    assert resumed_from(again.log()) == second_stop
    assert_matches_straight(straight_run, run_dir)


@pytest.mark.skipif(not own_shm_possible(), reason="two nodes on one machine need a private /dev/shm each (root)")
def test_one_rank_then_two_nodes_with_their_own_folders(tmp_path, epoch_shards, straight_run, s3_url):
    node0, node1 = tmp_path / "node0", tmp_path / "node1"
    first = start(tmp_path / "a", data_args(epoch_shards, s3_url, node0), node0 / RUN_NAME)
    first.wait_step(random.randint(2, STEPS - 4))
    first.signal(signal.SIGTERM)
    assert first.wait() == EXIT_PREEMPTED, first.log()
    stop = preempted_at(first.log())

    port = free_port()
    nodes = [start(tmp_path / f"b{n}", data_args(epoch_shards, s3_url, folder), folder / RUN_NAME, node=(n, 2, port))
             for n, folder in enumerate((node0, node1))]
    for node in nodes:
        assert node.wait() == 0, node.log()
    assert resumed_from(nodes[0].log()) == resumed_from(nodes[1].log()) == stop
    assert f"downloaded checkpoint {s3_url}/{RUN_NAME}/checkpoints/step-{stop:09d} into {node1}" in nodes[1].log()
    assert f"{node0}" not in nodes[1].log()
    assert_matches_straight(straight_run, node0 / RUN_NAME, node1 / RUN_NAME)
