"""How dip-prep starts worker processes: forked from a clean, pre-loaded fork server.

Plain fork would copy this process's boto3 connections and background threads (tqdm's monitor, upload
pools) into every worker, a known source of deadlocks; spawn is safe but makes every worker import torch
and Streaming anew (seconds each). A fork server is a fresh single-threaded process that imports the
heavy modules once and forks the workers from there.
"""

from __future__ import annotations

import multiprocessing
from multiprocessing.context import BaseContext

_PRELOAD = ["data_prep.write", "data_prep.verify"]


def worker_context() -> BaseContext:
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")  # platforms without fork
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(_PRELOAD)
    return context
