"""Faults around checkpoints: each one ends in a resume from the newest intact checkpoint, with nothing lost
and a warning that says what was wrong.

- the choice of checkpoint, directly: a truncated or altered file, a malformed manifest, an incomplete
  checkpoint (no manifest, locally or in S3), `latest` naming a checkpoint that is gone, nothing intact;
- uploads a previous process could not finish are caught up;
- in real runs: a second signal during the checkpoint of the first, then a truncated newest checkpoint
  and a stale `latest`; the S3 store down, stalled and back during training (uploads continue, retention
  waits for them); the store unreachable when a fresh machine starts (no start from scratch).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import signal
import time
from pathlib import Path

import psutil
import pytest

from dip_scale.checkpoint import (
    LATEST,
    MANIFEST,
    Uploader,
    checkpoint_name,
    describe_files,
    find_resume_checkpoint,
    write_manifest,
)
from dip_scale.storage import S3Store
from tests.storage.s3_proxy import FaultyProxy
from tests.train.runs import (
    EVERY,
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
from tests.train.test_resume import EXIT_PREEMPTED, complete_steps, remote_steps, resumed_from

# ----------------------------------------------------------------------------------------------------
# Which checkpoint a resume picks (no training: checkpoints of a few files with real manifests)
# ----------------------------------------------------------------------------------------------------


def make_checkpoint(root: Path, step: int, manifest: bool = True) -> Path:
    folder = root / "checkpoints" / checkpoint_name(step)
    folder.mkdir(parents=True)
    (folder / "state.pt").write_bytes(bytes([step % 256]) * 1000)
    (folder / "recipe.yaml").write_text(f"step: {step}\n")
    if manifest:
        write_manifest(folder, step, describe_files(folder, ["state.pt", "recipe.yaml"]), "state.pt", {})
    return folder


def upload_checkpoint(store: S3Store, folder: Path, manifest: bool = True) -> None:
    for f in sorted(folder.iterdir()):
        if f.name != MANIFEST or manifest:
            store.upload(f, f"checkpoints/{folder.name}/{f.name}")


@pytest.fixture
def warnings_log(caplog):
    caplog.set_level(logging.WARNING, logger="dip_scale.checkpoint")
    return lambda: "\n".join(r.getMessage() for r in caplog.records)


def test_truncated_file_falls_back_to_previous(tmp_path, warnings_log):
    make_checkpoint(tmp_path, 4)
    newest = make_checkpoint(tmp_path, 8)
    with open(newest / "state.pt", "r+b") as f:
        f.truncate(500)
    assert find_resume_checkpoint(tmp_path) == (4, str(tmp_path / "checkpoints" / checkpoint_name(4) / "state.pt"))
    assert "step-000000008: state.pt has 500 bytes, manifest says 1000" in warnings_log()


def test_altered_file_falls_back_to_previous(tmp_path, warnings_log):
    make_checkpoint(tmp_path, 4)
    newest = make_checkpoint(tmp_path, 8)
    (newest / "state.pt").write_bytes(b"\xff" * 1000)  # same size, other bytes
    assert find_resume_checkpoint(tmp_path)[0] == 4
    assert "step-000000008: checksum mismatch in state.pt" in warnings_log()


@pytest.mark.parametrize("manifest", ["{not json", '{"files": []}', ""])
def test_malformed_manifest_falls_back(tmp_path, warnings_log, manifest):
    make_checkpoint(tmp_path, 4)
    (make_checkpoint(tmp_path, 8) / MANIFEST).write_text(manifest)
    assert find_resume_checkpoint(tmp_path)[0] == 4
    assert "skipping local checkpoint" in warnings_log() and "manifest" in warnings_log()


def test_incomplete_checkpoint_is_never_loaded(tmp_path, warnings_log):
    make_checkpoint(tmp_path, 4)
    make_checkpoint(tmp_path, 8, manifest=False)  # a second signal, or a crash, before the manifest
    shutil.copytree(tmp_path / "checkpoints" / checkpoint_name(4), tmp_path / "checkpoints" / "step-000000012.tmp")
    assert find_resume_checkpoint(tmp_path)[0] == 4
    assert "step-000000008: no manifest (incomplete checkpoint)" in warnings_log()


def test_latest_naming_a_missing_checkpoint(tmp_path, warnings_log):
    make_checkpoint(tmp_path, 4)
    make_checkpoint(tmp_path, 8)
    (tmp_path / LATEST).write_text("step-000000012")
    assert find_resume_checkpoint(tmp_path)[0] == 8
    assert "names step-000000012, which does not exist" in warnings_log()


def test_nothing_intact_starts_fresh(tmp_path, warnings_log):
    make_checkpoint(tmp_path, 4, manifest=False)
    assert find_resume_checkpoint(tmp_path) is None
    assert find_resume_checkpoint(tmp_path / "never-used") is None


def test_remote_faults_fall_back_to_the_newest_intact(tmp_path, s3_url, warnings_log):
    """A fresh machine (empty local folder): S3 holds 4 (intact), 8 (altered), 12 (no manifest: an upload
    cut short) and a `latest` naming 16, which is gone."""
    store = S3Store(s3_url)
    made = tmp_path / "made"
    for step in (4, 8, 12):
        upload_checkpoint(store, make_checkpoint(made, step), manifest=step != 12)
    store.upload(made / "checkpoints" / checkpoint_name(4) / "state.pt", "checkpoints/step-000000008/state.pt")
    store.write_text(LATEST, "step-000000016")
    machine = tmp_path / "machine"
    step, path = find_resume_checkpoint(machine, store)
    assert step == 4
    assert Path(path).read_bytes() == (made / "checkpoints" / checkpoint_name(4) / "state.pt").read_bytes()
    log = warnings_log()
    assert "step-000000012: no manifest in the remote store (incomplete upload)" in log
    assert "step-000000008: checksum mismatch in state.pt" in log
    assert "names step-000000016, which does not exist" in log
    # Nothing broken was left behind for a later start to trip over.
    assert sorted(p.name for p in (machine / "checkpoints").iterdir()) == [checkpoint_name(4)]


def test_broken_local_copy_is_replaced_by_the_remote_one(tmp_path, s3_url, warnings_log):
    store = S3Store(s3_url)
    folder = make_checkpoint(tmp_path, 8)
    upload_checkpoint(store, folder)
    good = (folder / "state.pt").read_bytes()
    (folder / "state.pt").write_bytes(b"")
    assert find_resume_checkpoint(tmp_path, store)[0] == 8
    assert (folder / "state.pt").read_bytes() == good
    assert "skipping local checkpoint" in warnings_log()


def test_uploads_left_by_a_previous_process_are_caught_up(tmp_path, s3_url):
    """Local 4, 8, 12 complete; S3 has 4 only (the store was down, or the grace period ran out)."""
    store = S3Store(s3_url)
    upload_checkpoint(store, make_checkpoint(tmp_path, 4))
    local = [(s, make_checkpoint(tmp_path, s)) for s in (8, 12)]
    local.append((16, make_checkpoint(tmp_path, 16, manifest=False)))  # incomplete: not uploaded
    uploader = Uploader(store)
    uploader.catch_up(local, keep_last=2, milestones={4})
    deadline = time.monotonic() + 60
    while not uploader.idle():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert sorted(store.list_dirs("checkpoints")) == [checkpoint_name(s) for s in (4, 8, 12)]
    assert store.read_text(LATEST) == checkpoint_name(12)
    assert find_resume_checkpoint(tmp_path / "fresh", store)[0] == 12
    assert not uploader.pinned


# ----------------------------------------------------------------------------------------------------
# Real runs
# ----------------------------------------------------------------------------------------------------



def assert_final_equals_straight(straight: Path, *run_dirs: Path) -> None:
    for part in ("model", "optimizers"):
        assert_bitwise_equal(checkpoint_state(run_dirs[-1], STEPS)[part], checkpoint_state(straight, STEPS)[part], part)
    assert samples_by_step(*run_dirs) == samples_by_step(straight)
    assert_each_epoch_once(samples_by_step(*run_dirs), STEPS)
    assert losses(*run_dirs) == losses(straight)


@pytest.mark.slow
def test_second_signal_truncated_checkpoint_and_stale_latest(tmp_path, epoch_shards, straight_run):
    """A second SIGTERM while the first one's checkpoint is written exits at once, leaving it partial; then the
    newest complete checkpoint is truncated, a manifest-less copy sits after it and `latest` names a missing
    one: the rerun resumes from the newest intact checkpoint, warns about each, and ends as if uninterrupted."""
    args = data_args(epoch_shards, tmp_path / "ckpt")
    run_dir = tmp_path / "ckpt" / RUN_NAME
    first = start(tmp_path / "1", args, run_dir)
    first.wait_step(2 * EVERY + 1)
    first.signal(signal.SIGTERM)
    # The second signal as soon as the checkpoint of the first is being written.
    deadline = time.monotonic() + 120
    while not list((run_dir / "checkpoints").glob("*.tmp")) and first.proc.poll() is None:
        assert time.monotonic() < deadline, first.log()
        time.sleep(0.002)
    try:
        first.signal(signal.SIGTERM)
    except psutil.NoSuchProcess:
        pass  # the first checkpoint was already done and the process gone
    assert first.wait() == EXIT_PREEMPTED, first.log()
    if "second signal" in first.log():  # it came while the checkpoint was being written: that one stays partial
        partial = list((run_dir / "checkpoints").glob("*.tmp"))
        assert partial and not any((p / MANIFEST).exists() for p in partial), first.log()
    # Whatever the second signal interrupted: every checkpoint that looks complete is.
    complete = complete_steps(run_dir)
    assert find_resume_checkpoint(run_dir)[0] == max(complete)

    # Now also: the newest complete checkpoint truncated, an incomplete one after it, `latest` stale.
    newest, expected = complete[-1], complete[-2]
    with open(run_dir / "checkpoints" / checkpoint_name(newest) / "state.pt", "r+b") as f:
        f.truncate(1000)
    incomplete = run_dir / "checkpoints" / checkpoint_name(newest + 1)
    shutil.copytree(run_dir / "checkpoints" / checkpoint_name(expected), incomplete)
    (incomplete / MANIFEST).unlink()
    (run_dir / LATEST).write_text(checkpoint_name(STEPS - 1))

    second = run(tmp_path / "2", args, run_dir)
    log = second.log()
    assert resumed_from(log) == expected, log
    assert f"{checkpoint_name(newest + 1)}: no manifest (incomplete checkpoint)" in log
    assert re.search(rf"{checkpoint_name(newest)}: state.pt has 1000 bytes, manifest says \d+", log)
    assert f"names {checkpoint_name(STEPS - 1)}, which does not exist" in log
    assert_final_equals_straight(straight_run, run_dir)


@pytest.mark.slow
def test_s3_outage_during_training(tmp_path, epoch_shards, straight_run, s3_server, s3_url):
    """The store goes down after step 1, training runs on (saving every 2 steps, keeping every unuploaded
    checkpoint), then the store stalls, then comes back: the uploads catch up, retention applies, S3 alone
    resumes the run at its end."""
    with FaultyProxy(s3_server.endpoint_url) as proxy:
        env = {"S3_ENDPOINT_URL": proxy.endpoint_url, "AWS_ENDPOINT_URL_S3": proxy.endpoint_url}
        args = data_args(epoch_shards, s3_url, tmp_path / "machine") + ["checkpoint.every=2"]
        run_dir = tmp_path / "machine" / RUN_NAME

        # A fresh machine while the store is down: it cannot know the run's state, so it does not start.
        proxy.set("down")
        refused = run(tmp_path / "0", args, run_dir, env=env, expect=EXIT_PREEMPTED)
        assert "not starting the run from scratch" in refused.log(), refused.log()
        assert not (run_dir / "checkpoints").exists()

        proxy.set("up")
        r = start(tmp_path / "1", args, run_dir, env=env)
        r.wait_step(1)
        proxy.set("down")
        r.wait_step(STEPS)  # training did not wait for the store
        deadline = time.monotonic() + 300
        while "CHECKPOINT STORE UNREACHABLE" not in r.log():
            assert time.monotonic() < deadline and r.proc.poll() is None, r.log()
            time.sleep(0.1)
        # Nothing is deleted locally before it is uploaded.
        assert complete_steps(run_dir) == list(range(2, STEPS + 1, 2))
        stalled = proxy.refused
        proxy.set("stall")
        while proxy.refused == stalled:
            assert time.monotonic() < deadline and r.proc.poll() is None, r.log()
            time.sleep(0.1)
        proxy.set("up")
        assert r.wait() == 0, r.log()
    log = r.log()
    assert "is reachable again" in log, log
    assert remote_steps(s3_server, s3_url) == {4: True, 10: True, 12: True}
    assert complete_steps(run_dir) == [4, 10, 12]
    assert_final_equals_straight(straight_run, run_dir)
    # Only S3 is needed to pick the run up again.
    step, path = find_resume_checkpoint(tmp_path / "elsewhere", S3Store(f"{s3_url}/{RUN_NAME}"))
    assert step == STEPS
    assert Path(path).read_bytes() == (run_dir / "checkpoints" / checkpoint_name(STEPS) / "state.pt").read_bytes()
    manifest = json.loads((run_dir / "checkpoints" / checkpoint_name(STEPS) / MANIFEST).read_text())
    assert manifest["step"] == STEPS
