"""The per-job local cache folder where Streaming keeps downloaded shards.

Two jobs on one node must never share a cache folder: Streaming registers each folder in shared memory
and refuses (or corrupts) a second user. All ranks of one job on a node must agree on it, since they
share the node's cache. The folder is `<base>/<host>-<job key>`, where

    base     = the `base` argument, else $DIP_CACHE_DIR, else <tempdir>/dip_scale_cache
               (<tempdir> is $TMPDIR or /tmp: node-local on clusters; a per-job TMPDIR is fine too)
    job key  = $DIP_JOB_ID if set (any scheduler; set it to the same value for all ranks of a job),
               else slurm-<SLURM_JOB_ID>[.<SLURM_STEP_ID>] inside Slurm (distinct per job and job step),
               else launcher-<pid of the parent> for a process started by a launcher (composer, torchrun:
               they set LOCAL_RANK / LOCAL_WORLD_SIZE; all local ranks are children of one launcher),
               else pid-<own pid> for a plain single process.

The host name keeps nodes apart if `base` lies on a shared file system. A requeued Slurm job keeps its
job id and so its folder, and reuses the shards already downloaded; shared memory its killed previous
incarnation left behind is removed when the dataset is built (see shared_memory.py).
"""

from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import Mapping

CACHE_DIR_ENV = "DIP_CACHE_DIR"
JOB_ID_ENV = "DIP_JOB_ID"
_LAUNCHER_ENVS = ("LOCAL_RANK", "LOCAL_WORLD_SIZE")
# Slurm marks the batch and extern steps with these ids instead of a number.
_SLURM_PSEUDO_STEPS = {"batch", "extern", "4294967294", "4294967295"}


def job_key(environ: Mapping[str, str] = os.environ) -> str:
    """What identifies this job on this node; see the module docstring for the order of precedence."""
    if environ.get(JOB_ID_ENV):
        return _safe(environ[JOB_ID_ENV])
    if environ.get("SLURM_JOB_ID"):
        step = environ.get("SLURM_STEP_ID", "")
        suffix = f".{step}" if step and step not in _SLURM_PSEUDO_STEPS else ""
        return _safe(f"slurm-{environ['SLURM_JOB_ID']}{suffix}")
    if any(name in environ for name in _LAUNCHER_ENVS):
        return f"launcher-{os.getppid()}"
    return f"pid-{os.getpid()}"


def _safe(text: str) -> str:
    """The text usable as one path component."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text) or "_"


def job_cache_dir(base: str | None = None) -> str:
    """Create (if needed) and return this job's local cache folder; see the module docstring."""
    root = base or os.environ.get(CACHE_DIR_ENV) or os.path.join(tempfile.gettempdir(), "dip_scale_cache")
    host = _safe(socket.gethostname().split(".")[0])
    path = os.path.join(os.path.abspath(os.path.expanduser(root)), f"{host}-{job_key()}")
    os.makedirs(path, exist_ok=True)
    return path
