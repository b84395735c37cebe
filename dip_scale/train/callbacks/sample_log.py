"""Record which samples every step trained on (recipe: logging.sample_ids), to check data order.

Each rank appends one line per step to `<run>/samples_seen.jsonl`: {"step", "epoch", "rank", "ids"}, with
`step` counted after the update (1 is the first step) and `ids` the global sample indices of this rank's
batch, in batch order. A run that is killed and resumed repeats the steps after its checkpoint, so a step
can appear more than once; the last record of a (rank, step) is the one whose update survived.

Each record is one `write` to a file opened for appending, so the ranks' lines never interleave. Off by
default: it exists for the resumption and elastic tests, and costs a host sync of the ids when on.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist

FILENAME = "samples_seen.jsonl"


class SampleLog(Callback):
    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / FILENAME

    def batch_end(self, state: State, logger: Logger):
        _, _, ids = state.batch  # (images, labels, sample ids): the dataset's return_index
        record = {"step": int(state.timestamp.batch), "epoch": int(state.timestamp.epoch),
                  "rank": dist.get_global_rank(), "ids": [int(i) for i in ids.tolist()]}
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (json.dumps(record) + "\n").encode())
        finally:
            os.close(fd)
