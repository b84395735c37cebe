"""The training data loader: a StreamingDataset over dip-prep datasets, local or in S3, one or mixed.

    loader = build_dataloader("s3://bucket/imagenet256", batch_size=32, num_workers=8, shuffle=True,
                              shuffle_seed=0, num_canonical_nodes=1)
    for images, labels in loader:          # (B, 3, 256, 256) uint8, (B,) int64
        x = images_to_float(images.cuda(non_blocking=True))   # [-1, 1], normalised on the device

What Streaming gives us and what it asks in return:
- Order: a pure function of (shuffle_seed, epoch, num_canonical_nodes). Keep num_canonical_nodes and the
  global batch fixed for a run, and the run can resume on any number of nodes with the same order.
- Resume: Composer checkpoints `dataset.state_dict(samples_in_epoch, True)` and restores it with
  `load_state_dict`; the next epoch then yields exactly the samples not yet seen.
- `batch_size` is the per-device batch, the one the DataLoader uses.
- Remote streams are cached under `job_cache_dir()`, one folder per job (see job_cache.py); shared
  memory that a killed job left registered for those folders is removed first (see shared_memory.py).
By default images leave the workers as uint8 (4x less host work and transfer than float32); `output="float"`
gives float32 in [-1, 1] for CPU use.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from typing import Any

import numpy as np
import torch
from PIL import Image
from streaming import Stream, StreamingDataset
from torch.utils.data import DataLoader

from dip_scale.data.guard import DataStoreUnavailable, GuardedDataLoader, stop_batch
from dip_scale.data.job_cache import job_cache_dir
from dip_scale.data.layout import DATASET_INFO_FILE, IMAGE_COLUMN, LABEL_COLUMN, read_dataset_info
from dip_scale.data.shared_memory import clean_stale_shared_memory, record_owner
from dip_scale.storage import is_remote
from dip_scale.storage.s3 import _translate

log = logging.getLogger(__name__)

OUTPUTS = ("uint8", "float")
STREAM_KEYS = ("remote", "local", "proportion", "repeat", "choose")
"""Keys a stream dict may hold (Streaming's Stream arguments of the same names)."""


def images_to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 images (any shape) -> float32 in [-1, 1]: the model's input range."""
    return images.to(torch.float32).div_(127.5).sub_(1.0)


def _cache_name(remote: str) -> str:
    """A readable, collision-free folder name for a remote: its last component plus a hash of it all."""
    tail = remote.rstrip("/").rsplit("/", 1)[-1] or "root"
    tail = "".join(c if c.isalnum() or c in "-_." else "_" for c in tail)
    return f"{tail}-{hashlib.sha256(remote.encode()).hexdigest()[:12]}"


def _to_chw_uint8(image: Any, sample_id: int) -> torch.Tensor:
    if isinstance(image, Image.Image):
        if image.mode != "RGB":
            image = image.convert("RGB")
        array = np.array(image)  # decodes; a writable copy, as torch.from_numpy wants
    else:
        array = np.array(image, dtype=np.uint8, copy=True)  # raw columns decode to read-only views
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"sample {sample_id}: image has shape {array.shape}, expected (H, W, 3)")
    return torch.from_numpy(array).permute(2, 0, 1)  # (3, H, W)


# ----------------------------------------------------------------------------------------------------
# Downloads: retried loudly, stopped on request
# ----------------------------------------------------------------------------------------------------

_STOP = threading.Event()


def request_stop() -> None:
    """Ask every download of this process to give up at its next retry (a preemption signal: the trainer will
    checkpoint and exit, waiting for a shard would only delay that)."""
    _STOP.set()


class DiPStream(Stream):
    """A Streaming stream whose shard downloads retry with backoff and say so loudly (the shard and the store),
    give up with DataStoreUnavailable after `download_retry` retries, and give up at once after request_stop().
    Streaming's own retry is silent and, when it gives up in a background thread, leaves the loader waiting
    (see data/guard.py)."""

    def _download_file(self, from_basename: str, to_basename: str | None = None) -> str:
        remote = os.path.join(self.remote, self.split, from_basename) if self.remote else None
        local = os.path.join(self.local, self.split, to_basename or from_basename)
        delay, attempts = 1.0, self.download_retry + 1
        for attempt in range(1, attempts + 1):
            try:
                self._downloader.download(remote, local, self.download_timeout)
                if attempt > 1:
                    log.warning("DATA: %s downloaded after %d attempts; training goes on", remote, attempt)
                return local
            except FileNotFoundError:
                raise  # a local stream without the file: nothing to retry
            except Exception as err:  # noqa: BLE001  (botocore's, Streaming's, the network's)
                self._downloader.clean_up()
                final = _translate(err, "download", remote or local)
                if isinstance(final, (FileNotFoundError, PermissionError)):
                    raise final from err  # a missing shard or no permission: retrying cannot help
                if attempt == attempts or _STOP.is_set():
                    why = "a stop was requested" if _STOP.is_set() else f"{attempts} attempts failed"
                    raise DataStoreUnavailable(f"cannot download {remote} ({why}; last error "
                                               f"{type(err).__name__}: {err})") from err
                log.error("DATA STORE UNREACHABLE: downloading %s failed (%s: %s); retry %d of %d in %.0f s",
                          remote, type(err).__name__, err, attempt, attempts - 1, delay)
                if _STOP.wait(delay):
                    raise DataStoreUnavailable(f"cannot download {remote} (a stop was requested)") from err
                delay = min(2 * delay, 30.0)
        raise AssertionError("unreachable")


def _dataset_info(remote: str | None, local: str) -> dict[str, Any]:
    """dataset.json of a stream: read where it lies (a local folder, s3://), or, for the other schemes Streaming
    reads (gs://, oci://, azure://, hf://, ...), downloaded by Streaming's own downloader into the cache."""
    if not remote or "://" not in remote or is_remote(remote):
        return read_dataset_info(remote or local)
    from streaming.base.storage import download_file

    path = os.path.join(local, DATASET_INFO_FILE)
    if not os.path.isfile(path):
        download_file(f"{remote.rstrip('/')}/{DATASET_INFO_FILE}", path, 60)
    return read_dataset_info(local)


class DiPStreamingDataset(StreamingDataset):
    """(image, label) or (image, label, sample_index) from one or several dip-prep datasets.

    Args:
        remote: s3://bucket/prefix (or a local folder Streaming copies from) of a single stream.
        local: its local cache folder; default `<job_cache_dir(cache_dir)>/<name-hash of remote>`. With no
            remote, the dataset is read in place from `local`.
        streams: instead of remote/local, dicts with keys remote, local, proportion (or repeat, choose).
        batch_size: the per-device batch size.
        shuffle, shuffle_seed: shuffled order, a pure function of the seed and the epoch.
        num_canonical_nodes: fix it (e.g. to the first run's node count) for node-count-independent order.
        output: "uint8" -> (3, H, W) torch.uint8; "float" -> (3, H, W) float32 in [-1, 1].
        return_index: also return the sample's global index in the dataset (stream order, then source order).
        cache_dir: base for the default local folders (see job_cache_dir).
        download_retry: retries of a failed shard download (with backoff 1, 2, 4, ... 30 s, logged loudly) before
            it gives up with DataStoreUnavailable; download_timeout: seconds one attempt may take.
        **kwargs: other StreamingDataset arguments (predownload, cache_limit, shuffle_algo, epoch_size, ...).
    """

    def __init__(self, remote: str | None = None, local: str | None = None,
                 streams: list[dict[str, Any]] | None = None, *, batch_size: int, shuffle: bool = False,
                 shuffle_seed: int = 9176, num_canonical_nodes: int | None = None, output: str = "uint8",
                 return_index: bool = False, cache_dir: str | None = None, download_retry: int = 6,
                 download_timeout: float = 60.0, **kwargs: Any) -> None:
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
        if batch_size <= 0:
            raise ValueError(f"batch_size (per device) must be positive, got {batch_size}")
        if streams is not None and (remote is not None or local is not None):
            raise ValueError("give either `streams` or `remote`/`local`, not both")
        if streams is None:
            if remote is None and local is None:
                raise ValueError("give `remote` (s3://... or a folder), `local` (a folder), or `streams`")
            streams = [{"remote": remote, "local": local}]
        if not streams:
            raise ValueError("`streams` is empty")

        resolved = [self._resolve_stream(i, spec, cache_dir) for i, spec in enumerate(streams)]
        self.infos = [_dataset_info(spec["remote"], spec["local"]) for spec in resolved]
        self._check_compatible(resolved)
        # Only cache folders of remote streams: Streaming checks no others, and a local dataset may be read-only.
        caches = [spec["local"] for spec in resolved if spec["remote"]]
        clean_stale_shared_memory(caches)

        self.output = output
        self.return_index = return_index
        super().__init__(streams=[DiPStream(**spec, download_retry=download_retry, download_timeout=download_timeout)
                                  for spec in resolved], batch_size=batch_size, shuffle=shuffle,
                         shuffle_seed=shuffle_seed, num_canonical_nodes=num_canonical_nodes, **kwargs)
        if self._unique_rank_world.is_local_leader:
            record_owner(caches, self._shm_prefix_int)

    @staticmethod
    def _resolve_stream(number: int, spec: dict[str, Any], cache_dir: str | None) -> dict[str, Any]:
        unknown = set(spec) - set(STREAM_KEYS)
        if unknown:
            raise ValueError(f"stream {number}: unknown key(s) {sorted(unknown)}; allowed: {STREAM_KEYS}")
        spec = {key: spec.get(key) for key in STREAM_KEYS}
        if not spec["remote"] and not spec["local"]:
            raise ValueError(f"stream {number}: needs `remote` or `local`")
        if spec["remote"] and not spec["local"]:
            spec["local"] = os.path.join(job_cache_dir(cache_dir), _cache_name(spec["remote"]))
        spec["local"] = os.path.abspath(os.path.expanduser(spec["local"]))
        return spec

    def _check_compatible(self, streams: list[dict[str, Any]]) -> None:
        first = self.infos[0]
        for spec, info in zip(streams[1:], self.infos[1:]):
            where = spec["remote"] or spec["local"]
            if info["resolution"] != first["resolution"]:
                raise ValueError(f"stream {where} has resolution {info['resolution']}, the first stream "
                                 f"{first['resolution']}: batches need one resolution")
            if info["class_names"] != first["class_names"]:
                raise ValueError(f"stream {where} has other classes than the first stream: labels would mean "
                                 "different things")

    @property
    def resolution(self) -> int:
        return int(self.infos[0]["resolution"])

    @property
    def class_names(self) -> list[str]:
        return list(self.infos[0]["class_names"])

    @property
    def num_classes(self) -> int:
        return int(self.infos[0]["num_classes"])

    def on_exception(self, future) -> None:
        """A background download thread ended with an error: note it for the iterating thread (Streaming's own
        version re-raises it inside the thread pool's callback, where it only prints a traceback)."""
        error = future.exception()
        if error is not None:
            self._background_error = error
            self._event.set()

    def _background_failure(self, where: str) -> BaseException:
        error = getattr(self, "_background_error", None)
        if error is None or isinstance(error, DataStoreUnavailable):
            return DataStoreUnavailable(f"{where}: {error or 'a background shard download failed'}")
        return error

    def __iter__(self):
        yield from super().__iter__()
        if getattr(self, "_event", None) is not None and self._event.is_set():
            # Streaming ends the epoch early when a background download failed: never a short epoch.
            raise self._background_failure("the epoch cannot go on")

    def get_item(self, sample_id: int, retry: int = 7) -> tuple:
        try:
            sample = super().get_item(sample_id, retry)
        except RuntimeError as err:  # Streaming's "Background thread failed": one of our downloads gave up
            if "Background thread failed" in str(err):
                raise self._background_failure(f"sample {sample_id}") from err
            raise
        image = _to_chw_uint8(sample[IMAGE_COLUMN], sample_id)
        if self.output == "float":
            image = images_to_float(image)
        label = int(sample[LABEL_COLUMN])
        return (image, label, sample_id) if self.return_index else (image, label)


def build_dataloader(remote: str | None = None, local: str | None = None,
                     streams: list[dict[str, Any]] | None = None, *, batch_size: int, num_workers: int = 8,
                     shuffle: bool = False, shuffle_seed: int = 9176, num_canonical_nodes: int | None = None,
                     output: str = "uint8", return_index: bool = False, drop_last: bool = True,
                     pin_memory: bool | None = None, prefetch_factor: int = 2, persistent_workers: bool = True,
                     cache_dir: str | None = None, stall_timeout: float | None = None,
                     **dataset_kwargs: Any) -> DataLoader:
    """A DataLoader around a DiPStreamingDataset (Composer checkpoints the dataset's position).

    `batch_size` is per device. `pin_memory` defaults to whether CUDA is available. With `stall_timeout` (and
    return_index), a GuardedDataLoader (data/guard.py): no wait for a batch longer than that many seconds.
    """
    dataset = DiPStreamingDataset(remote, local, streams, batch_size=batch_size, shuffle=shuffle,
                                  shuffle_seed=shuffle_seed, num_canonical_nodes=num_canonical_nodes, output=output,
                                  return_index=return_index, cache_dir=cache_dir, **dataset_kwargs)
    options = dict(batch_size=batch_size, num_workers=num_workers, drop_last=drop_last,
                   pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
                   prefetch_factor=prefetch_factor if num_workers > 0 else None,
                   persistent_workers=persistent_workers and num_workers > 0)
    if stall_timeout is None:
        return DataLoader(dataset, **options)
    if not return_index:
        raise ValueError("a guarded loader marks stop batches by their sample ids: it needs return_index=True")
    size = (dataset.resolution, dataset.resolution)
    return GuardedDataLoader(dataset, stall_timeout=stall_timeout, stop_batch=stop_batch(batch_size, size), **options)
