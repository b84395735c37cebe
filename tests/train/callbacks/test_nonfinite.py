"""The NaN/Inf guard in a real run: a non-finite loss (made so by the DIP_TEST_NONFINITE_STEP hook) stops the
run with exit 3, a clear message and a checkpoint of the last good state; with train.nonfinite=skip the
step is skipped and training goes on (here: the stopped run, resumed)."""

from __future__ import annotations

import math

import pytest

from tests.train.runs import RUN_NAME, assert_bitwise_equal, checkpoint_state, data_args, losses, run

pytestmark = pytest.mark.slow

EXIT_NONFINITE = 3


def adam_steps(state: dict) -> set[float]:
    """The step counters of the optimizer's per-parameter state (one value when all moved together)."""
    (opt,) = state["optimizers"].values()
    return {float(s["step"]) for s in opt["state"].values()}


def test_nonfinite_stop_then_skip(tmp_path, epoch_shards):
    args = data_args(epoch_shards, tmp_path / "ckpt") + ["train.max_steps=6", "checkpoint.every=2"]
    run_dir = tmp_path / "ckpt" / RUN_NAME

    stopped = run(tmp_path / "stop", args, run_dir, env={"DIP_TEST_NONFINITE_STEP": "3"}, expect=EXIT_NONFINITE)
    log = stopped.log()
    assert "step 3: non-finite loss or gradient" in log and "train.nonfinite=skip" in log, log
    # The checkpoint written on the stop holds the weights, EMA and optimizer state of step 2.
    last_good, at_stop = checkpoint_state(run_dir, 2), checkpoint_state(run_dir, 3)
    assert_bitwise_equal(at_stop["model"], last_good["model"], "model and EMA at the stop vs. step 2")
    assert_bitwise_equal(at_stop["optimizers"], last_good["optimizers"], "optimizer at the stop vs. step 2")
    assert adam_steps(at_stop) == {2.0}

    # Resumed with skip: step 5's update is dropped, the run goes on to the end.
    skipped = run(tmp_path / "skip", args + ["train.nonfinite=skip"], run_dir, env={"DIP_TEST_NONFINITE_STEP": "5"})
    log = skipped.log()
    assert "resuming tiny from step 3" in log and "step 5: non-finite loss or gradient" in log, log
    assert "the update was skipped" in log, log
    assert adam_steps(checkpoint_state(run_dir, 6)) == {4.0}  # steps 1, 2, 4, 6 (3 and 5 refused)
    loss = losses(run_dir)
    assert math.isnan(loss[3]) and math.isnan(loss[5])
    assert all(math.isfinite(loss[s]) for s in (1, 2, 4, 6))
