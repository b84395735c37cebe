"""A start, from the first instruction to the first step: a preemption signal at any moment of it exits 75 (a
requeue), never 143 / 138 (a crash to a job script); and nodes that cannot all read the run's newest
checkpoint refuse to start (exit 2) instead of silently starting over."""

from __future__ import annotations

import json
import signal
import time

import pytest

from tests.storage.s3_proxy import FaultyProxy
from tests.train.launch import free_port
from tests.train.runs import RUN_NAME, data_args, run, start

pytestmark = pytest.mark.slow

EXIT_PREEMPTED = 75


@pytest.mark.parametrize("after", [0.3, 2.0, 6.0])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1], ids=["TERM", "USR1"])
def test_signal_in_the_first_seconds_exits_75(tmp_path, epoch_shards, after, sig):
    """Imports (torch, Composer, Streaming), the process group, building the model and data: a signal at 0.3 s,
    2 s or 6 s lands in one of them (the start takes 10-20 s on two cores)."""
    r = start(tmp_path / "log", data_args(epoch_shards, tmp_path / "ckpt"), tmp_path / "ckpt" / RUN_NAME)
    time.sleep(after)
    assert r.proc.poll() is None, r.log()
    r.proc.send_signal(sig)
    assert r.wait(timeout=120) == EXIT_PREEMPTED, r.log()
    assert not (tmp_path / "ckpt" / RUN_NAME / "checkpoints").exists()


def test_signal_during_the_checkpoint_download_exits_75(tmp_path, epoch_shards, s3_server, s3_url):
    """A fresh machine resumes from S3; the store stalls in the middle of the download; SIGTERM ends it with 75
    at once, and nothing half-downloaded is taken for a checkpoint on the next start."""
    machine = tmp_path / "machine"
    args = data_args(epoch_shards, s3_url, tmp_path / "first") + ["train.max_steps=4", "checkpoint.every=4"]
    run(tmp_path / "0", args, tmp_path / "first" / RUN_NAME)
    with FaultyProxy(s3_server.endpoint_url) as proxy:
        env = {"S3_ENDPOINT_URL": proxy.endpoint_url, "AWS_ENDPOINT_URL_S3": proxy.endpoint_url}
        resume = data_args(epoch_shards, s3_url, machine) + ["train.max_steps=6", "checkpoint.every=4"]
        r = start(tmp_path / "1", resume, machine / RUN_NAME, env=env)
        r.wait_log("downloading checkpoint")
        proxy.set("stall")
        time.sleep(1.0)
        r.proc.send_signal(signal.SIGTERM)
        started = time.monotonic()
        assert r.wait(timeout=120) == EXIT_PREEMPTED, r.log()
        assert time.monotonic() - started < 30, r.log()
        proxy.set("up")
    again = run(tmp_path / "2", resume, machine / RUN_NAME)
    assert "resuming tiny from step 4" in again.log(), again.log()


def test_signal_during_the_first_compile_checkpoints_and_exits_75(tmp_path, epoch_shards):
    """torch.compile runs inside the first step (inductor generates and builds C++ on a CPU: tens of seconds);
    by then the checkpointing handler is in place: the step finishes, is checkpointed, and the run exits 75."""
    run_dir = tmp_path / "ckpt" / RUN_NAME
    r = start(tmp_path / "log", data_args(epoch_shards, tmp_path / "ckpt") + ["train.compile=true",
                                                                            "train.compile_backend=inductor"], run_dir)
    r.wait_log("training tiny from step 0")
    time.sleep(1.0)
    assert not r.steps(), "the first step finished before the signal: compilation was too quick to test this"
    r.signal(signal.SIGTERM)
    assert r.wait(timeout=600) == EXIT_PREEMPTED, r.log()
    manifest = json.loads((run_dir / "checkpoints" / "step-000000001" / "manifest.json").read_text())
    assert manifest["step"] == 1


def test_nodes_whose_save_folders_differ_refuse_to_resume(tmp_path, epoch_shards):
    """Two nodes (a launcher of one rank each) whose save folders are not one folder: the first run trains and
    checkpoints (each node keeps its own part); the rerun must not start over, nor from an older checkpoint:
    both nodes exit 2 naming the save folder."""
    folders = [tmp_path / "node0", tmp_path / "node1"]
    extra = ["train.max_steps=4", "checkpoint.every=2"]

    def both(tag: str, steps: int) -> list:
        port = free_port()
        return [start(tmp_path / f"{tag}{n}", data_args(epoch_shards, folder) + extra + [f"train.max_steps={steps}"],
                      folder / RUN_NAME, node=(n, 2, port)) for n, folder in enumerate(folders)]

    for node in both("a", 4):
        assert node.wait() == 0, node.log()
    assert (folders[0] / RUN_NAME / "checkpoints" / "step-000000004" / "state.pt").is_file()
    assert not (folders[1] / RUN_NAME / "checkpoints" / "step-000000004" / "state.pt").exists()
    for n, node in enumerate(both("b", 6)):
        assert node.wait() == 2, node.log()
        assert "do not share this folder" in node.log() and "checkpoint.save_folder=" in node.log(), node.log()
        assert "Traceback" not in node.log(), node.log()
    assert not (folders[0] / RUN_NAME / "checkpoints" / "step-000000006").exists()
