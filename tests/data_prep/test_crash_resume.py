"""Kill `dip-prep write` (SIGKILL, with its workers) mid-run; the same command then finishes the job with
every image exactly once. Locally and straight to S3."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from data_prep.cli import main
from data_prep.verify import verify_dataset
from dip_scale.data import DiPStreamingDataset, read_dataset_info, synthetic_image
from dip_scale.storage import open_store

REPO = Path(__file__).resolve().parents[2]
NUM_IMAGES, CHUNK, RESOLUTION = 2400, 100, 32


def _done_parts(out: str) -> set[str]:
    return {name.split("/")[0] for name in open_store(out).list("part-") if name.endswith("/done.json")}


@pytest.mark.parametrize("where,workers", [("local", 1), ("s3", 2)])
def test_rerun_after_kill_completes_without_duplicates(where: str, workers: int, tmp_path: Path,
                                                       request: pytest.FixtureRequest,
                                                       capsys: pytest.CaptureFixture) -> None:
    out = request.getfixturevalue("s3_url") if where == "s3" else str(tmp_path / "out")
    args = ["write", "synthetic", out, "--num-images", str(NUM_IMAGES), "--resolution", str(RESOLUTION),
            "--encoding", "png", "--chunk-size", str(CHUNK), "--workers", str(workers), "--no-progress"]

    # A new session, so that the kill takes the workers and the fork server too, as a scheduler would.
    process = subprocess.Popen([sys.executable, "-m", "data_prep", *args], cwd=REPO, start_new_session=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while len(_done_parts(out)) < 3:
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the write made no progress"
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()

    num_chunks = NUM_IMAGES // CHUNK
    done_at_kill = _done_parts(out)
    assert len(done_at_kill) < num_chunks, "the write finished before the kill: the test proved nothing"
    assert not open_store(out).exists("index.json")

    assert main(args) == 0
    # Requests the killed process had in flight may still land after the listing above: at least the
    # chunks seen complete are kept, and together with those redone they are all the chunks.
    found = re.search(r"([\d,]+) written now, ([\d,]+) already complete", capsys.readouterr().out)
    assert found, "no chunk counts in the summary"
    written_now, kept = (int(group.replace(",", "")) for group in found.groups())
    assert written_now + kept == num_chunks and kept >= len(done_at_kill) and written_now > 0

    report = verify_dataset(out, progress=False)
    assert report.ok, report.format()
    assert read_dataset_info(out)["num_samples"] == NUM_IMAGES

    # Exactly the source, in order: nothing duplicated, nothing dropped, nothing half-written.
    local = str(tmp_path / "cache") if where == "s3" else None
    ds = DiPStreamingDataset(remote=out, local=local, batch_size=1) if where == "s3" \
        else DiPStreamingDataset(local=out, batch_size=1)
    assert ds.num_samples == NUM_IMAGES
    for index in range(NUM_IMAGES):
        image, label = ds[index]
        want, want_label = synthetic_image(index, RESOLUTION, 0)
        assert label == want_label
        np.testing.assert_array_equal(image.permute(1, 2, 0).numpy(), want)
