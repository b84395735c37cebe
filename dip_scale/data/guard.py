"""A DataLoader whose next batch is never waited for without bound.

Streaming downloads shards in background threads. When the data store goes away for longer than the
downloads' own retries (see DiPStream in data/streaming.py), a failed download either crashes the epoch or,
in Streaming 0.13, leaves the loader waiting for a shard that no thread downloads any more: the step never
ends, and a preemption signal is never honoured. GuardedDataLoader fetches batches on a thread of its own and
waits for each in short slices, so that the training process always gets an answer:

- a batch;
- or a *stop batch*: a batch of the usual shape whose sample ids are all -1, when the store stayed
  unreachable (DataStoreUnavailable from a worker), when no batch came for `stall_timeout` seconds, or when
  a stop was requested (a preemption signal) while the batch was still missing.

The trainer (train/callbacks/preemption.py) agrees on a stop batch across ranks before the step runs, saves a
checkpoint of the last completed step and exits 75: the requeued job resumes exactly there (the dataset's
position is the trained steps', not the fetched ones'). Any other error of the data (a corrupt shard, a bad
image) is raised as it is: requeueing cannot fix it.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable

import torch
from torch.utils.data import DataLoader

from dip_scale.storage import StoreUnavailable

log = logging.getLogger(__name__)

STOP_ID = -1


class DataStoreUnavailable(StoreUnavailable):
    """The data store stayed unreachable for longer than the download retries (data.download_retry)."""


def is_stop_batch(batch) -> bool:
    """Whether a (images, labels, sample ids) batch is a stop batch (checked on the host, before the step)."""
    return isinstance(batch, (tuple, list)) and len(batch) == 3 and bool((batch[2] == STOP_ID).all())


def _is_store_failure(err: BaseException) -> bool:
    # A worker's exception comes back re-raised by the DataLoader, possibly as another class with its message.
    return isinstance(err, StoreUnavailable) or "DataStoreUnavailable" in f"{type(err).__name__}: {err}"


class GuardedDataLoader(DataLoader):
    """A DataLoader (Composer checkpoints its dataset's position as usual) with bounded waits; see the module
    docstring. `stall_timeout`: seconds without a batch before giving up; `should_stop`: set by the trainer,
    returns True once a stop was requested; `stop_batch`: makes a stop batch."""

    def __init__(self, *args, stall_timeout: float, stop_batch: Callable[[], tuple], **kwargs):
        super().__init__(*args, **kwargs)
        self.stall_timeout = stall_timeout
        self.stop_batch = stop_batch
        self.should_stop: Callable[[], bool] = lambda: False
        self.stop_reason: str | None = None

    def __iter__(self):
        batches = super().__iter__()
        items: queue.Queue = queue.Queue(maxsize=1)
        finished = threading.Event()

        def fetch():
            try:
                for batch in batches:
                    while not finished.is_set():
                        try:
                            items.put(("batch", batch), timeout=0.5)
                            break
                        except queue.Full:
                            continue
                    if finished.is_set():
                        return
                items.put(("end", None))
            except BaseException as err:  # noqa: BLE001  (handed to the training thread)
                items.put(("error", err))

        thread = threading.Thread(target=fetch, name="guarded-data", daemon=True)
        thread.start()
        try:
            while True:
                kind, value = self._next(items)
                if kind == "end":
                    return
                if kind == "stop":
                    yield self.stop_batch()
                    return
                yield value
        finally:
            finished.set()

    def _next(self, items: queue.Queue) -> tuple[str, object]:
        waited, start, warned = 0.0, time.monotonic(), False
        while True:
            try:
                kind, value = items.get(timeout=0.25)
            except queue.Empty:
                waited = time.monotonic() - start
                if self.should_stop():
                    return self._stop("a stop was requested while waiting for the next batch")
                if waited >= self.stall_timeout:
                    return self._stop(f"no batch for {waited:.0f} s (data.stall_timeout={self.stall_timeout:g})")
                if waited >= 30 and not warned:
                    log.warning("DATA: waiting %.0f s for the next batch (the data store is slow or unreachable)",
                                waited)
                    warned = True
                continue
            if kind == "error":
                if _is_store_failure(value):
                    return self._stop(str(value))
                raise value
            if warned:
                log.warning("DATA: the next batch came after %.0f s; training goes on", time.monotonic() - start)
            return kind, value

    def _stop(self, reason: str) -> tuple[str, None]:
        self.stop_reason = reason
        log.error("DATA UNAVAILABLE: %s; checkpointing the last completed step and stopping for a requeue", reason)
        return "stop", None


def stop_batch(batch_size: int, image_size: tuple[int, int]) -> Callable[[], tuple]:
    """A maker of stop batches shaped like the training batches: uint8 images, labels, sample ids of -1."""

    def make() -> tuple:
        ids = torch.full((batch_size,), STOP_ID, dtype=torch.long)
        return torch.zeros(batch_size, 3, *image_size, dtype=torch.uint8), torch.zeros_like(ids), ids

    return make
