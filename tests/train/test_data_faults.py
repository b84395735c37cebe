"""Training data in S3 through an outage: short ones are ridden out (retried, loudly), long ones and stalls end
the run through the preemption path (a checkpoint of the last completed step, exit 75), a signal during an
outage is honoured at once, and a start while the store is down exits 75. After the reruns every run equals
an uninterrupted one: the same losses, the same weights, every sample once per epoch.

The data: 240 synthetic images in 48 shards (5 images each) in the S3 server on loopback, read through a
fault proxy (tests/storage/s3_proxy.py); Streaming downloads shards ahead of the step that needs them, so a
fault from step 2 on hits downloads the run still needs. Checkpoints are local: only the data store fails.
Budgets are shortened for the tests: 2 retries of 2 s (data.download_retry, data.download_timeout), 20 s
without a batch (data.stall_timeout).
"""

from __future__ import annotations

import re
import signal
import time
from pathlib import Path

import pytest

from tests.storage.s3_proxy import FaultyProxy
from tests.train.launch import final_model
from tests.train.runs import RUN_NAME, assert_bitwise_equal, losses, run, samples_by_step, start

pytestmark = pytest.mark.slow

EXIT_PREEMPTED = 75
IMAGES, PER_SHARD, BATCH = 240, 5, 16
STEPS = IMAGES // BATCH  # one epoch
BUDGET = ["data.download_retry=2", "data.download_timeout=2", "data.stall_timeout=20"]


def args(data: str, folder: Path, *extra: str) -> list[str]:
    return [f"data.remote={data}", f"checkpoint.save_folder={folder}", f"train.max_steps={STEPS}",
            "checkpoint.every=5", "checkpoint.milestones=[]", *BUDGET, *extra]


@pytest.fixture(scope="module")
def s3_data(s3_server) -> str:
    from data_prep.synthetic import write_synthetic_shards

    url = s3_server.fresh_url("data-faults")
    write_synthetic_shards(url, num_images=IMAGES, resolution=32, seed=0, chunk_size=PER_SHARD)
    return url


@pytest.fixture(scope="module")
def straight(tmp_path_factory, s3_data) -> Path:
    tmp = tmp_path_factory.mktemp("straight")
    run(tmp / "log", args(s3_data, tmp / "ckpt"), tmp / "ckpt" / RUN_NAME)
    return tmp / "ckpt" / RUN_NAME


@pytest.fixture
def proxy(s3_server):
    with FaultyProxy(s3_server.endpoint_url) as p:
        yield p


def through(proxy) -> dict:
    return {"S3_ENDPOINT_URL": proxy.endpoint_url, "AWS_ENDPOINT_URL_S3": proxy.endpoint_url}


def assert_equals_straight(straight: Path, run_dir: Path) -> None:
    seen = samples_by_step(run_dir)
    assert sorted(seen) == list(range(1, STEPS + 1)), sorted(seen)
    assert sorted(i for ids in seen.values() for i in ids) == list(range(IMAGES))  # every sample once
    assert seen == samples_by_step(straight)
    assert losses(run_dir) == losses(straight)
    assert_bitwise_equal(final_model(run_dir, STEPS), final_model(straight, STEPS), "model and EMA")


def test_short_outage_is_ridden_out(tmp_path, s3_data, straight, proxy):
    run_dir = tmp_path / "ckpt" / RUN_NAME
    r = start(tmp_path / "log", args(s3_data, tmp_path / "ckpt"), run_dir, env=through(proxy))
    r.wait_step(2)
    proxy.set("down")
    time.sleep(1.5)  # shorter than the retries' backoff (1 + 2 s)
    proxy.set("up")
    assert r.wait() == 0, r.log()
    assert proxy.refused > 0 and "DATA STORE UNREACHABLE" in r.log(), r.log()
    assert_equals_straight(straight, run_dir)


@pytest.mark.parametrize("fault", ["down", "stall"])
def test_long_outage_checkpoints_and_requeues(tmp_path, s3_data, straight, proxy, fault):
    run_dir = tmp_path / "ckpt" / RUN_NAME
    r = start(tmp_path / "log", args(s3_data, tmp_path / "ckpt"), run_dir, env=through(proxy))
    r.wait_step(2)
    proxy.set(fault)
    assert r.wait(timeout=300) == EXIT_PREEMPTED, r.log()
    log = r.log()
    assert "DATA UNAVAILABLE" in log and "preempted at step" in log, log
    assert "Traceback" not in log, log
    proxy.set("up")
    again = run(tmp_path / "log2", args(s3_data, tmp_path / "ckpt"), run_dir, env=through(proxy))
    assert "resuming tiny from step" in again.log()
    assert_equals_straight(straight, run_dir)


def test_signal_during_an_outage_is_honoured_at_once(tmp_path, s3_data, straight, proxy):
    """The retries would wait minutes (30 retries); SIGTERM ends the wait, checkpoints and exits 75."""
    run_dir = tmp_path / "ckpt" / RUN_NAME
    patient = args(s3_data, tmp_path / "ckpt", "data.download_retry=30", "data.stall_timeout=600",
                   "train.dist_timeout=900")
    r = start(tmp_path / "log", patient, run_dir, env=through(proxy))
    r.wait_step(2)
    proxy.set("down")
    r.wait_log("DATA STORE UNREACHABLE", timeout=120)
    r.signal(signal.SIGTERM)
    sent = time.monotonic()
    assert r.wait(timeout=120) == EXIT_PREEMPTED, r.log()
    assert time.monotonic() - sent < 30, r.log()
    proxy.set("up")
    run(tmp_path / "log2", patient, run_dir, env=through(proxy))
    assert_equals_straight(straight, run_dir)


def test_start_while_the_data_store_is_down_exits_75(tmp_path, s3_data, proxy):
    proxy.set("down")
    r = run(tmp_path / "log", args(s3_data, tmp_path / "ckpt"), tmp_path / "ckpt" / RUN_NAME,
            env={**through(proxy), "AWS_MAX_ATTEMPTS": "2"}, expect=EXIT_PREEMPTED)
    assert "failed after retries" in r.log() and s3_data in r.log(), r.log()
    assert not (tmp_path / "ckpt" / RUN_NAME / "checkpoints").exists()


def test_two_ranks_stop_together_and_resume(tmp_path, s3_data, straight, proxy):
    """One store, two ranks: whichever rank misses its data first, both checkpoint the same step and exit 75.
    The store goes down at the 40th request (the indexes and some shards are through), not after a step seen
    from here: the ranks download ahead, and a test that looks late would find every shard already there."""
    run_dir = tmp_path / "ckpt" / RUN_NAME
    proxy.set_after(40, "down")
    r = start(tmp_path / "log", args(s3_data, tmp_path / "ckpt"), run_dir, nproc=2, env=through(proxy))
    assert r.wait(timeout=300) == EXIT_PREEMPTED, r.log()
    assert re.search(r"preempted at step [1-9]", r.log()), r.log()  # a checkpoint in the middle of the epoch
    proxy.set("up")
    run(tmp_path / "log2", args(s3_data, tmp_path / "ckpt"), run_dir, nproc=2, env=through(proxy))
    seen = samples_by_step(run_dir)
    assert sorted(i for ids in seen.values() for i in ids) == list(range(IMAGES))
    expected = samples_by_step(straight)
    assert {s: sorted(ids) for s, ids in seen.items()} == {s: sorted(ids) for s, ids in expected.items()}
    for step, loss in losses(straight).items():
        assert losses(run_dir)[step] == pytest.approx(loss, rel=1e-5), step


def test_outage_before_the_first_step_writes_no_checkpoint_and_the_rerun_starts_afresh(tmp_path, s3_data, straight,
                                                                                       proxy):
    """Nothing trained, nothing to keep: exit 75 without a step-0 checkpoint; the requeued run is a fresh one."""
    run_dir = tmp_path / "ckpt" / RUN_NAME
    proxy.set_after(8, "down")  # the start's own reads are through; the first shards are not
    r = run(tmp_path / "log", args(s3_data, tmp_path / "ckpt"), run_dir, env=through(proxy), expect=EXIT_PREEMPTED)
    assert "preempted before the first step" in r.log() and "nothing to checkpoint" in r.log(), r.log()
    assert not list(run_dir.glob("checkpoints/step-*"))
    proxy.set("up")
    again = run(tmp_path / "log2", args(s3_data, tmp_path / "ckpt"), run_dir, env=through(proxy))
    assert "resuming" not in again.log()
    assert_equals_straight(straight, run_dir)
