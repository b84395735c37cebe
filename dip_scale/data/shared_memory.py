"""Remove the shared memory a killed job left registered for *our* cache folders, and nothing else.

Streaming registers every dataset's local folders in a shared memory block (`/dev/shm/NNNNNN_locals`,
next to NNNNNN_barrier, NNNNNN_shard_states, ...). A job killed with its whole process group (scancel,
OOM killer, node preemption) leaves these blocks behind. A later job that uses the same local folder
(a requeued Slurm job keeps its job id, hence its cache folder) and runs with another temp folder (Slurm
often gives each job its own TMPDIR) then fails with "Reused local directory".
Streaming's own `clean_stale_shared_memory()` removes every block it can open, including those of live
jobs of the same user on the node, so it is unsafe on shared nodes. Here a prefix is removed only if its
locals name one of our folders and no process maps any of its blocks (from /proc/*/maps). Blocks are
created with mode 0600, so only their owner (or root) could map them, and the owner's processes are
visible in /proc. On systems without /dev/shm and /proc (macOS) this does nothing.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable

SHM_ROOT = "/dev/shm"
_LOCALS_NAME = re.compile(r"^(\d{6})_locals$")

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


def _mapped_shm_names() -> set[str]:
    """Names of the /dev/shm files any visible process currently maps."""
    names: set[str] = set()
    marker = SHM_ROOT + "/"
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/maps", encoding="utf-8", errors="replace") as maps:
                for line in maps:
                    at = line.find(marker)
                    if at >= 0:
                        names.add(line[at + len(marker):].rstrip("\n").removesuffix(" (deleted)"))
        except OSError:  # the process ended, or belongs to another user (who cannot map our blocks)
            continue
    return names


def clean_stale_shared_memory(local_dirs: Iterable[str]) -> list[int]:
    """Remove stale Streaming shared memory registered for any of `local_dirs`; returns removed prefixes."""
    if not (os.path.isdir(SHM_ROOT) and os.path.isdir("/proc")):
        return []
    ours = {os.path.abspath(d) for d in local_dirs}
    uid = os.getuid()
    candidates = []
    for name in os.listdir(SHM_ROOT):
        match = _LOCALS_NAME.match(name)
        path = os.path.join(SHM_ROOT, name)
        try:
            owned = os.stat(path).st_uid == uid
        except OSError:
            continue
        if match and owned and ours.intersection(_registered_locals(path)):
            candidates.append(match.group(1))
    if not candidates:
        return []

    mapped = _mapped_shm_names()
    removed = []
    everything = os.listdir(SHM_ROOT)
    for prefix in candidates:
        blocks = [name for name in everything if name.startswith(prefix + "_")]
        if any(block in mapped for block in blocks):
            continue  # a live process uses it: a real conflict, which Streaming will report
        for block in blocks:
            try:
                os.unlink(os.path.join(SHM_ROOT, block))
            except FileNotFoundError:
                pass  # another rank of this job removed it first
        removed.append(int(prefix))
        logger.warning("removed stale Streaming shared memory %s_* (registered for %s by a job that is gone)",
                       prefix, sorted(ours))
    return removed
