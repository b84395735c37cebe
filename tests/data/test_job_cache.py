"""The per-job cache folder: distinct per job, shared by the ranks of one job, chosen as documented."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from dip_scale.data.job_cache import job_cache_dir, job_key

REPO = Path(__file__).resolve().parents[2]


def test_precedence() -> None:
    assert job_key({"DIP_JOB_ID": "my run/1", "SLURM_JOB_ID": "5"}) == "my_run_1"
    assert job_key({"SLURM_JOB_ID": "123", "SLURM_STEP_ID": "2", "LOCAL_RANK": "0"}) == "slurm-123.2"
    assert job_key({"SLURM_JOB_ID": "123", "SLURM_STEP_ID": "batch"}) == "slurm-123"
    assert job_key({"SLURM_JOB_ID": "123", "SLURM_STEP_ID": "4294967294"}) == "slurm-123"
    assert job_key({"LOCAL_WORLD_SIZE": "8"}) == f"launcher-{os.getppid()}"
    assert job_key({}) == f"pid-{os.getpid()}"


def test_folder_layout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.delenv("DIP_JOB_ID", raising=False)
    monkeypatch.delenv("SLURM_STEP_ID", raising=False)
    path = job_cache_dir(str(tmp_path))
    assert path == str(tmp_path / f"{socket.gethostname().split('.')[0]}-slurm-42") and os.path.isdir(path)
    monkeypatch.setenv("SLURM_JOB_ID", "43")
    assert job_cache_dir(str(tmp_path)) != path
    monkeypatch.setenv("DIP_CACHE_DIR", str(tmp_path / "env"))
    assert job_cache_dir().startswith(str(tmp_path / "env") + "/")


# Each "rank" prints the folder it would use; the script stands in for a launcher (composer, torchrun).
_RANK = ("import json, sys; from dip_scale.data.job_cache import job_cache_dir; "
         "print(json.dumps(job_cache_dir(sys.argv[1])))")
_LAUNCHER = """
import json, os, subprocess, sys
env = {k: v for k, v in os.environ.items() if k not in ("SLURM_JOB_ID", "DIP_JOB_ID")}
ranks = [subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2]], stdout=subprocess.PIPE, text=True,
                          env={**env, "LOCAL_RANK": str(r), "LOCAL_WORLD_SIZE": "2"}) for r in range(2)]
print(json.dumps([json.loads(p.communicate()[0]) for p in ranks]))
"""


def _launch(base: Path) -> list[str]:
    result = subprocess.run([sys.executable, "-c", _LAUNCHER, _RANK, str(base)], cwd=REPO, capture_output=True,
                            text=True, timeout=120, check=True)
    return json.loads(result.stdout)


def test_ranks_of_one_launch_agree_and_two_launches_differ(tmp_path: Path) -> None:
    first, second = _launch(tmp_path), _launch(tmp_path)
    assert first[0] == first[1] and second[0] == second[1]
    assert first[0] != second[0]
