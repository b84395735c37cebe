"""Rerunning the same command resumes, and a run interrupted any number of times ends bitwise equal to one
that never was: model, EMA and optimizer state (fp32 on CPU), the loss of every step, and the samples of
every step (each epoch sees each sample exactly once).

Interruptions happen at a random step: SIGKILL (resume from the last periodic checkpoint) and SIGTERM (the
trainer checkpoints at the end of the step and exits 75; resume from exactly there; during start-up it
exits 75 at once). With the save folder in S3 every rerun happens on a fresh machine folder, so only S3
holds the checkpoints. Rerunning a finished run is a no-op; retention keeps the newest K plus milestones.
"""

from __future__ import annotations

import json
import random
import re
import signal
from pathlib import Path

import pytest

from tests.train.launch import final_model
from tests.train.runs import (
    EVERY,
    KEEP_LAST,
    MILESTONE,
    RUN_NAME,
    STEPS,
    assert_bitwise_equal,
    assert_each_epoch_once,
    checkpoint_state,
    data_args,
    losses,
    run,
    samples_by_step,
    start,
)

pytestmark = pytest.mark.slow

EXIT_PREEMPTED = 75


def resumed_from(log: str) -> int | None:
    found = re.findall(rf"resuming {RUN_NAME} from step (\d+)", log)
    return int(found[-1]) if found else None


def complete_steps(run_dir: Path) -> list[int]:
    return sorted(int(d.name[5:]) for d in (run_dir / "checkpoints").glob("step-*") if (d / "manifest.json").is_file())


def assert_same_as_straight(straight: Path, *run_dirs: Path) -> None:
    assert_bitwise_equal(checkpoint_state(run_dirs[-1], STEPS)["model"], checkpoint_state(straight, STEPS)["model"],
                         "model and EMA")
    assert_bitwise_equal(checkpoint_state(run_dirs[-1], STEPS)["optimizers"],
                         checkpoint_state(straight, STEPS)["optimizers"], "optimizer state")
    expected = samples_by_step(straight)
    assert_each_epoch_once(expected, STEPS)
    assert samples_by_step(*run_dirs) == expected
    assert losses(*run_dirs) == losses(straight)


def test_killed_and_terminated_run_equals_uninterrupted(tmp_path, epoch_shards, straight_run):
    rng = random.Random()
    args = data_args(epoch_shards, tmp_path / "ckpt")
    run_dir = tmp_path / "ckpt" / RUN_NAME

    # SIGKILL after the first periodic checkpoint: the steps since it are lost and redone.
    first = start(tmp_path / "1", args, run_dir)
    kill_at = first.wait_step(rng.randint(EVERY + 1, STEPS - 4))
    first.signal(signal.SIGKILL)
    assert first.wait() == -signal.SIGKILL
    newest = max(complete_steps(run_dir))
    assert newest % EVERY == 0 and newest <= kill_at + 1

    # SIGTERM while the rerun is still starting: nothing new to save, exit 75 (a requeue) all the same.
    early = start(tmp_path / "1b", args, run_dir)
    early.wait_log(f"resuming {RUN_NAME} from step {newest}")
    early.signal(signal.SIGTERM)
    assert early.wait() == EXIT_PREEMPTED, early.log()
    assert "before training started" in early.log() and max(complete_steps(run_dir)) == newest

    # SIGTERM: a checkpoint of the step in progress, exit 75.
    second = start(tmp_path / "2", args, run_dir)
    term_at = second.wait_step(rng.randint(newest + 1, max(newest + 1, STEPS - 4)))
    second.signal_now(signal.SIGTERM)
    assert second.wait() == EXIT_PREEMPTED, second.log()
    log = second.log()
    assert resumed_from(log) == newest, log
    preempted = int(re.search(r"preempted at step (\d+)", log).group(1))
    assert term_at <= preempted < STEPS and preempted in complete_steps(run_dir), log

    third = run(tmp_path / "3", args, run_dir)
    assert resumed_from(third.log()) == preempted
    assert_same_as_straight(straight_run, run_dir)

    # Rerunning a finished run is a no-op, not an error.
    again = run(tmp_path / "4", args, run_dir)
    assert "already complete" in again.log()
    # Retention: the newest KEEP_LAST plus the milestone.
    assert complete_steps(run_dir) == sorted({MILESTONE, *complete_steps(run_dir)[-KEEP_LAST:]})
    assert len(complete_steps(run_dir)) == KEEP_LAST + 1


def remote_steps(s3_server, url: str) -> dict[int, bool]:
    """step -> whether its remote checkpoint is complete (has its manifest)."""
    out: dict[int, bool] = {}
    for key in s3_server.list_keys(f"{url}/{RUN_NAME}/checkpoints/"):
        folder, _, name = key.split("/checkpoints/")[1].partition("/")
        step = int(folder[5:])
        out[step] = out.get(step, False) or name == "manifest.json"
    return out


def test_resume_from_s3_on_fresh_machine_folders(tmp_path, epoch_shards, straight_run, s3_server, s3_url):
    """Each (re)start gets a new, empty machine folder: the run lives on through S3 alone."""
    rng = random.Random()

    def args(machine: str) -> list[str]:
        return data_args(epoch_shards, s3_url, tmp_path / machine)

    # Machine a: SIGTERM -> checkpoint, uploaded before the exit.
    a = start(tmp_path / "a-log", args("a"), tmp_path / "a" / RUN_NAME)
    a.wait_step(rng.randint(2, EVERY + 2))
    a.signal(signal.SIGTERM)
    assert a.wait() == EXIT_PREEMPTED, a.log()
    preempted = int(re.search(r"preempted at step (\d+)", a.log()).group(1))
    assert remote_steps(s3_server, s3_url).get(preempted), a.log()

    # Machine b: resumes from S3, then dies (SIGKILL) after its next periodic checkpoint.
    b = start(tmp_path / "b-log", args("b"), tmp_path / "b" / RUN_NAME)
    b.wait_step(rng.randint((preempted // EVERY + 1) * EVERY + 1, STEPS - 2))
    b.signal(signal.SIGKILL)
    assert b.wait() == -signal.SIGKILL
    assert resumed_from(b.log()) == preempted, b.log()
    # Whatever b managed to commit (its periodic checkpoint, unless the kill came first) is where c goes on.
    newest = max(s for s, complete in remote_steps(s3_server, s3_url).items() if complete)

    # Machine c: resumes from the newest complete checkpoint in S3 and finishes.
    c = run(tmp_path / "c-log", args("c"), tmp_path / "c" / RUN_NAME)
    assert resumed_from(c.log()) == newest, c.log()
    assert_same_as_straight(straight_run, *(tmp_path / m / RUN_NAME for m in "abc"))
    # Remote retention: the newest KEEP_LAST plus the milestone, all complete.
    assert remote_steps(s3_server, s3_url) == {MILESTONE: True, STEPS - EVERY: True, STEPS: True}


def test_fsdp_sharded_checkpoints_resume_exactly(tmp_path, epoch_shards):
    """FSDP: every rank writes its shard (`sharded/__<rank>_0.distcp`, the manifest covers them all); a 2-rank
    run stopped by SIGUSR1 to one rank and rerun ends bitwise equal to an uninterrupted 2-rank run."""
    args = ["parallelism.strategy=fsdp", "train.max_steps=6", "checkpoint.every=2"]
    straight = run(tmp_path / "straight", data_args(epoch_shards, tmp_path / "s") + args, tmp_path / "s" / RUN_NAME,
                   nproc=2)
    run_dir = tmp_path / "ckpt" / RUN_NAME
    first = start(tmp_path / "1", data_args(epoch_shards, tmp_path / "ckpt") + args, run_dir, nproc=2)
    first.wait_step(random.randint(1, 3))
    first.signal(signal.SIGUSR1, ranks=[0])
    assert first.wait() == EXIT_PREEMPTED, first.log()
    preempted = int(re.search(r"preempted at step (\d+)", first.log()).group(1))
    manifest = json.loads((run_dir / "checkpoints" / f"step-{preempted:09d}" / "manifest.json").read_text())
    assert manifest["load"] == "sharded"
    assert {"sharded/__0_0.distcp", "sharded/__1_0.distcp"} <= manifest["files"].keys()

    second = run(tmp_path / "2", data_args(epoch_shards, tmp_path / "ckpt") + args, run_dir, nproc=2)
    assert resumed_from(second.log()) == preempted
    assert losses(run_dir) == losses(straight.run_dir)
    assert samples_by_step(run_dir) == samples_by_step(straight.run_dir)
    assert_bitwise_equal(final_model(run_dir, 6), final_model(straight.run_dir, 6), "model and EMA")


def test_ctrl_c_in_a_terminal_checkpoints_and_the_same_command_continues(tmp_path, epoch_shards, straight_run):
    """`composer -n 1 -m dip_scale.train ...` in a terminal, Ctrl-C: the rank gets SIGINT from the terminal and
    then SIGTERM from the launcher passing it on; that is one request, not two, so the step in progress is
    checkpointed and the launcher ends with 75. Rerunning the command continues to the straight run's end."""
    args = data_args(epoch_shards, tmp_path / "ckpt")
    run_dir = tmp_path / "ckpt" / RUN_NAME
    first = start(tmp_path / "1", args, run_dir, terminal=True)
    first.wait_step(random.randint(2, STEPS - 4))
    first.ctrl_c()
    assert first.wait() == EXIT_PREEMPTED, first.log()
    log = first.log()
    assert "received SIGINT" in log and "second signal" not in log, log
    preempted = int(re.search(r"preempted at step (\d+)", log).group(1))
    assert preempted in complete_steps(run_dir), log
    second = run(tmp_path / "2", args, run_dir)
    assert resumed_from(second.log()) == preempted
    assert_same_as_straight(straight_run, run_dir)
