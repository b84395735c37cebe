"""Read what an offline wandb run wrote, as the tests check it: the records of its `run-<id>.wandb` file.

The file is wandb's transaction log: a 7-byte header (":W&B", magic 0xBEE1, a version byte), then the LevelDB log
format (32 KiB blocks; each record chunk has a header of CRC-32, length and type FULL / FIRST / MIDDLE / LAST;
a block's tail shorter than a header is padding). Each whole record is a serialized `wandb.proto` Record.
Written here instead of using wandb's reader, which newer wandb releases no longer ship in Python.

    run = read_offline_runs(run_dir / "wandb")["<run id>"]
    run.config["train"]["global_batch_size"]     # the resolved recipe, nested
    run.history[12]["loss/train/total"]           # step -> {key: value} of everything logged at that step
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

_HEADER = struct.Struct("<4sHB")
_BLOCK = 32 * 1024
_CHUNK = struct.Struct("<IHB")
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def records(path: Path) -> list[bytes]:
    """The serialized records of a .wandb file, in order (a record still being written is left out)."""
    data = Path(path).read_bytes()
    ident, magic, version = _HEADER.unpack_from(data, 0)
    assert (ident, magic) == (b":W&B", 0xBEE1), f"{path}: not a wandb log ({ident!r}, {magic:#x}, v{version})"
    out, pending, pos = [], b"", _HEADER.size
    while pos + _CHUNK.size <= len(data):
        room = _BLOCK - pos % _BLOCK
        if room < _CHUNK.size:  # padding at the end of a block
            pos += room
            continue
        checksum, length, kind = _CHUNK.unpack_from(data, pos)
        if length == 0 and kind == 0:  # zero padding (a torn or preallocated tail)
            pos += room
            continue
        if pos + _CHUNK.size + length > len(data):  # the writer (wandb's service process) is not done yet
            break
        payload = data[pos + _CHUNK.size:pos + _CHUNK.size + length]
        assert zlib.crc32(bytes([kind]) + payload) & 0xFFFFFFFF == checksum, f"{path}: bad checksum at {pos}"
        pos += _CHUNK.size + length
        if kind == _FULL:
            out.append(payload)
        elif kind == _FIRST:
            pending = payload
        elif kind == _MIDDLE:
            pending += payload
        elif kind == _LAST:
            out.append(pending + payload)
            pending = b""
    return out


@dataclass
class OfflineRun:
    run_id: str
    config: dict = field(default_factory=dict)
    """The run's config, nested as logged (wandb's own `_wandb` entry removed)."""
    history: dict[int, dict] = field(default_factory=dict)
    """step -> every key logged at that step (later writes of a key win)."""
    step_metrics: dict[str, str] = field(default_factory=dict)
    """define_metric: metric name or glob -> the metric it is plotted against."""
    group: str = ""
    """The run's group."""
    files: list[Path] = field(default_factory=list)
    """The run's .wandb files (one per process that wrote to it: a resume appends a new one)."""


def _value(item) -> object:
    return json.loads(item.value_json)


def parsed_records(path: Path) -> list:
    """The records of a .wandb file as wandb.proto Record messages."""
    from wandb.proto import wandb_internal_pb2 as pb

    return [pb.Record.FromString(raw) for raw in records(path)]


def read_run_file(path: Path, run: OfflineRun) -> None:
    for record in parsed_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run.group = record.run.run_group or run.group
        if kind in ("run", "config"):  # init's config comes with the run record, later updates on their own
            for item in (record.run.config if kind == "run" else record.config).update:
                key = item.key or "/".join(item.nested_key)
                if key != "_wandb":
                    run.config[key] = _value(item)
        elif kind == "metric":
            run.step_metrics[record.metric.glob_name or record.metric.name] = record.metric.step_metric
        elif kind == "history":
            row = {(item.key or "/".join(item.nested_key)): _value(item) for item in record.history.item}
            step = record.history.step.num if record.history.HasField("step") else row.get("_step")
            run.history.setdefault(int(step), {}).update(row)


def read_offline_runs(wandb_dir: Path) -> dict[str, OfflineRun]:
    """Every offline run under a `wandb/` folder, by run id, its files read in the order they were written."""
    runs: dict[str, OfflineRun] = {}
    for path in sorted(Path(wandb_dir).glob("offline-run-*/run-*.wandb")):
        run_id = path.stem[len("run-"):]
        read_run_file(path, runs.setdefault(run_id, OfflineRun(run_id)))
        runs[run_id].files.append(path)
    return runs
