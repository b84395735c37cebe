"""A job killed with its whole process group leaves Streaming's shared memory behind; the next job on the
same cache folder (a requeued job, with a fresh TMPDIR as Slurm gives each job) must still start, and
blocks of live jobs must never be touched."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
from streaming.base.constant import LOCALS
from streaming.base.shared.prefix import _check_and_find

from dip_scale.data.shared_memory import (
    OWNER_FILE,
    SHM_ROOT,
    _registered_locals,
    clean_stale_shared_memory,
    record_owner,
)

REPO = Path(__file__).resolve().parents[2]

_JOB = """
import sys, time
from dip_scale.data import DiPStreamingDataset
dataset = DiPStreamingDataset(remote=sys.argv[1], local=sys.argv[2], batch_size=2)
count = sum(1 for _ in dataset)
print(f"read {count}", flush=True)
if sys.argv[3] == "hang":
    time.sleep(600)
"""

pytestmark = pytest.mark.skipif(not os.path.isdir(SHM_ROOT) or not os.path.isdir("/proc"),
                                reason="needs /dev/shm and /proc")


def _prefixes_registered_for(local: str) -> list[int]:
    found = []
    for name in os.listdir(SHM_ROOT):
        match = re.match(r"^(\d{6})_locals$", name)
        if match and local in _registered_locals(os.path.join(SHM_ROOT, name)):
            found.append(int(match.group(1)))
    return found


def _job(remote: str, local: str, tmpdir: Path, mode: str) -> subprocess.Popen:
    tmpdir.mkdir(exist_ok=True)
    return subprocess.Popen([sys.executable, "-c", _JOB, remote, local, mode], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                            env={**os.environ, "TMPDIR": str(tmpdir)})


def test_killed_job_does_not_break_the_next(synthetic_dataset: Callable[..., str], tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    remote = synthetic_dataset(num_images=32)
    local = str(tmp_path / "cache")

    first = _job(remote, local, tmp_path / "tmp-first", "hang")
    assert first.stdout.readline().strip() == "read 32", first.stderr.read() if first.poll() is not None else ""
    registered = _prefixes_registered_for(local)
    assert len(registered) == 1
    prefix = registered[0]
    # While the job lives, its blocks are in use: nothing is removed.
    assert clean_stale_shared_memory([local]) == []
    assert _prefixes_registered_for(local) == [prefix]

    os.killpg(first.pid, signal.SIGKILL)  # the whole group, resource tracker included, as scancel does
    first.wait()
    assert _prefixes_registered_for(local) == [prefix], "the kill left nothing behind: nothing to test"

    # Streaming alone, from a job with another TMPDIR, walks the prefixes up to the stale one and refuses.
    # That walk stops at the first free prefix, so the refusal is certain only while all lower prefixes
    # are taken (other processes on this machine may free one at any time).
    # Its temp folder (where it also looks for per-prefix lock files) is set to the new job's here.
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp-second"))
    lower_taken = all(os.path.exists(os.path.join(SHM_ROOT, f"{p:06d}_{LOCALS}")) for p in range(prefix))
    if lower_taken:
        with pytest.raises(ValueError, match="Reused local directory"):
            _check_and_find([local], [remote], LOCALS)
    monkeypatch.undo()

    second = _job(remote, local, tmp_path / "tmp-second", "exit")
    out, err = second.communicate(timeout=300)
    assert second.returncode == 0, err
    assert out.strip() == "read 32"
    assert f"removed stale Streaming shared memory {prefix:06d}_*" in err
    assert _prefixes_registered_for(local) == []  # the second job exited cleanly and released its own


def test_only_dead_owners_blocks_are_removed(tmp_path: Path) -> None:
    # A record naming a live process (this one) protects its prefix, whatever the blocks hold.
    local = str(tmp_path / "cache")
    record_owner([local], 999_999)
    assert clean_stale_shared_memory([local]) == []
    assert (tmp_path / "cache" / OWNER_FILE).exists()
    # A dead owner whose prefix's locals do not name the folder (the prefix was reused by another job):
    # nothing is removed, the stale record goes.
    record = json.loads((tmp_path / "cache" / OWNER_FILE).read_text())
    (tmp_path / "cache" / OWNER_FILE).write_text(json.dumps({**record, "start": "0"}))
    assert clean_stale_shared_memory([local]) == []
    assert not (tmp_path / "cache" / OWNER_FILE).exists()
