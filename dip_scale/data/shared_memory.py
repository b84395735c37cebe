"""Remove the shared memory a killed job left registered for *our* cache folders, and nothing else.

Streaming registers every dataset's local folders in a shared memory block (`/dev/shm/NNNNNN_locals`,
next to NNNNNN_barrier, NNNNNN_shard_states, ...). A job killed with its whole process group (scancel,
OOM killer, node preemption) leaves these blocks behind. A later job that uses the same local folder
(a requeued Slurm job keeps its job id, hence its cache folder) and runs with another temp folder (Slurm
often gives each job its own TMPDIR) then fails with "Reused local directory".

Streaming's own `clean_stale_shared_memory()` removes every block it can open, those of live jobs
included, so it is unsafe on shared nodes. Whether a block is in use cannot be read from /proc either:
Streaming maps every block it walks past while choosing a prefix and never lets go. So the dataset's
owner leaves a record instead: the local leader writes `.streaming-owner.json` (prefix, host, pid and
the process's start time, against pid reuse) into each remote stream's cache folder. A later dataset on
the same folder removes the recorded prefix's blocks only if that process is gone and the prefix's
locals still name the folder. Blocks we do not own cannot be removed (/dev/shm is sticky); on systems
without /dev/shm (macOS) nothing is done.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from collections.abc import Iterable

from dip_scale.storage import atomic_write

SHM_ROOT = "/dev/shm"
OWNER_FILE = ".streaming-owner.json"

logger = logging.getLogger(__name__)


def _registered_locals(path: str) -> list[str]:
    """The folders recorded in a Streaming locals block: int32 size, then '\\0'-joined folders, prefix."""
    try:
        with open(path, "rb") as file:
            data = file.read()
    except OSError:
        return []
    size = int.from_bytes(data[:4], "little", signed=True)
    if size <= 4 or size > len(data):
        return []  # zeroed by a dataset that was shut down normally
    return data[4:size].decode("utf-8", errors="replace").split("\0")[:-1]


def _start_time(pid: int) -> str | None:
    """When process `pid` started (clock ticks since boot, from /proc), or None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as file:
            stat = file.read()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22; the command name in (...) may contain spaces


def _host() -> str:
    return socket.gethostname()


def record_owner(local_dirs: Iterable[str], prefix: int) -> None:
    """Record that this process owns Streaming prefix `prefix`, registered for `local_dirs`."""
    record = {"prefix": prefix, "host": _host(), "pid": os.getpid(), "start": _start_time(os.getpid())}
    for directory in local_dirs:
        atomic_write(os.path.join(directory, OWNER_FILE), json.dumps(record))


def _owner_gone(record: dict) -> bool:
    start = _start_time(int(record["pid"]))
    return start is None or start != record.get("start")


def clean_stale_shared_memory(local_dirs: Iterable[str]) -> list[int]:
    """Remove Streaming blocks recorded for `local_dirs` by processes that are gone; returns the prefixes."""
    if not (os.path.isdir(SHM_ROOT) and os.path.isdir("/proc")):
        return []
    removed = []
    for directory in {os.path.abspath(d) for d in local_dirs}:
        record_path = os.path.join(directory, OWNER_FILE)
        try:
            with open(record_path, encoding="utf-8") as file:
                record = json.load(file)
            prefix = int(record["prefix"])
        except (OSError, ValueError, KeyError, TypeError):
            continue  # no record (or a torn one): nothing we can safely call stale
        if record.get("host") != _host() or not _owner_gone(record):
            continue
        tag = f"{prefix:06d}_"
        if directory in _registered_locals(os.path.join(SHM_ROOT, f"{tag}locals")):
            for name in os.listdir(SHM_ROOT):
                if name.startswith(tag):
                    try:
                        os.unlink(os.path.join(SHM_ROOT, name))
                    except FileNotFoundError:
                        pass  # another rank of this job removed it first
            removed.append(prefix)
            logger.warning("removed stale Streaming shared memory %s* registered for %s by process %s, "
                           "which is gone", tag, directory, record["pid"])
        try:
            os.unlink(record_path)
        except FileNotFoundError:
            pass
    return removed
