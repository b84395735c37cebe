"""Reference statistics for FID: the ADM reference batch, or statistics computed from our own images.

A reference is `ReferenceStats`: mu/sigma of the 2048-d pool features (FID), mu_s/sigma_s of the
2023-d spatial features (sFID) and a set of pool features for precision/recall. Sources:

- An ADM reference batch .npz, e.g. ImageNet 256 from the guided-diffusion evaluations:
      https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/imagenet/256/VIRTUAL_imagenet256_labeled.npz
  Its mu/sigma (and mu_s/sigma_s) are used as they are; the features of its arr_0 images (10,000
  uint8 NHWC) are computed once for precision/recall and cached next to the file. A .npz without
  mu/sigma but with arr_0 (any ADM sample batch) gets its statistics from arr_0, as ADM's evaluator does.
- Our MDS shards (a folder with index.json, or an s3:// prefix), e.g. the validation split, or a folder
  of same-sized images. All images are used once; the work is spread over the ranks of the job. The result
  is cached next to the data as `fid_stats-<inception fingerprint>.npz`: in the data folder (or the cache
  folder if that is read-only); for s3:// shards in the bucket next to them (and locally under the cache
  folder), so every job shares it.

The cached file is an ADM reference batch, which the ADM evaluator accepts as --ref_batch: `arr_0` (uint8
NHWC, the up to 10,000 evenly spaced images whose features serve precision/recall), `mu`/`sigma` of all the
images' pool features, `mu_s`/`sigma_s` of their spatial features. It adds `pool_features` (of the arr_0
images), `num_images` and `fingerprint` (of the Inception weights), which the ADM evaluator ignores. Its
statistics are of our Inception (torch-fidelity's port of the TF graph): with the real weights they are the
ADM evaluator's own up to float rounding; with other weights they are not comparable with published numbers.

    ref = load_reference("VIRTUAL_imagenet256_labeled.npz", inception)   # on rank 0; None elsewhere
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from dip_scale.eval.generate import broadcast_object, gather_rows, world
from dip_scale.eval.inception import POOL_DIM, SPATIAL_DIM, InceptionFeatures
from dip_scale.storage import NotFound, StoreUnavailable, atomic_write, open_parent

log = logging.getLogger(__name__)

ADM_REFERENCE_URL = ("https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/imagenet/256/"
                     "VIRTUAL_imagenet256_labeled.npz")
PR_REFERENCE_SIZE = 10_000  # ADM's reference batch holds 10,000 images for precision/recall
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


@dataclass
class ReferenceStats:
    mu: np.ndarray  # (2048,) float64
    sigma: np.ndarray  # (2048, 2048) float64
    mu_s: np.ndarray | None = None  # (2023,) float64
    sigma_s: np.ndarray | None = None  # (2023, 2023) float64
    pool: np.ndarray | None = None  # (K, 2048) float32, for precision/recall
    num_images: int | None = None
    source: str = ""
    images: np.ndarray | None = None  # (K, H, W, 3) uint8: the images of `pool`, ADM's arr_0

    def save(self, path: str | Path, fingerprint: str) -> None:
        """Atomic write of an ADM reference batch (arr_0, mu, sigma, mu_s, sigma_s) plus our pool features."""
        path = Path(path)
        arrays = {"mu": self.mu, "sigma": self.sigma, "fingerprint": np.array(fingerprint),
                  "num_images": np.array(self.num_images if self.num_images is not None else -1)}
        if self.images is not None:
            arrays["arr_0"] = self.images
        if self.mu_s is not None:
            arrays.update(mu_s=self.mu_s, sigma_s=self.sigma_s)
        if self.pool is not None:
            arrays["pool_features"] = self.pool
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        atomic_write(path, buf.getvalue())


# ----------------------------------------------------------------------------------------------------
# Moments: mean and covariance accumulated batch by batch, in float64, summed over ranks
# ----------------------------------------------------------------------------------------------------


class Moments:
    def __init__(self, dim: int, device: torch.device):
        self.n = 0
        self.sum = torch.zeros(dim, dtype=torch.float64, device=device)
        self.outer = torch.zeros(dim, dim, dtype=torch.float64, device=device)

    def add(self, features: torch.Tensor) -> None:
        f = features.to(self.sum.device, torch.float64)  # (B, D)
        self.n += f.shape[0]
        self.sum += f.sum(0)
        self.outer += f.T @ f

    def all_reduce(self) -> None:
        if world()[1] > 1:
            n = torch.tensor([float(self.n)], dtype=torch.float64, device=self.sum.device)
            for t in (n, self.sum, self.outer):
                dist.all_reduce(t)
            self.n = int(n.item())

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        """Unbiased covariance (n - 1), as np.cov."""
        if self.n < 2:
            raise ValueError(f"statistics need at least 2 images, got {self.n}")
        mu = self.sum / self.n
        cov = (self.outer - self.n * torch.outer(mu, mu)) / (self.n - 1)
        return mu.cpu().numpy(), cov.cpu().numpy()


# ----------------------------------------------------------------------------------------------------
# Image sources: len() and [i] -> uint8 (3, H, W)
# ----------------------------------------------------------------------------------------------------


class ImageSource(Protocol):
    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> torch.Tensor: ...


def _chw_uint8(image, where: str) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(image))
    if t.dtype != torch.uint8 or t.ndim != 3 or 3 not in (t.shape[0], t.shape[-1]):
        raise ValueError(f"{where}: expected a uint8 RGB image (3, H, W) or (H, W, 3), got {t.dtype} "
                         f"{tuple(t.shape)}")
    return t.contiguous() if t.shape[0] == 3 else t.permute(2, 0, 1).contiguous()


class ImageFolder:
    """Image files under a folder (recursively), in sorted path order, decoded to RGB."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.files = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not self.files:
            raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {self.root}")

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        from PIL import Image

        with Image.open(self.files[index]) as im:
            return _chw_uint8(np.array(im.convert("RGB")), str(self.files[index]))


class ArrayImages:
    """Rows of a uint8 NHWC array (arr_0 of an ADM batch)."""

    def __init__(self, images: np.ndarray, name: str):
        self.images, self.name = images, name

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        return _chw_uint8(self.images[index], f"{self.name}[{index}]")


class ShardImages:
    """Images of our MDS shards by index, through dip_scale.data's streaming dataset: a local folder read
    in place, or an s3:// prefix cached in the job's own folder (see dip_scale.data.job_cache)."""

    def __init__(self, location: str):
        from dip_scale.data import DiPStreamingDataset

        self.name = location
        remote = location if location.startswith("s3://") else None
        self.dataset = DiPStreamingDataset(remote=remote, local=None if remote else location, batch_size=1,
                                           shuffle=False, output="uint8")

    def __len__(self) -> int:
        return int(self.dataset.size)  # len() of a StreamingDataset is one rank's share of an epoch

    def __getitem__(self, index: int) -> torch.Tensor:
        image, _label = self.dataset[index]
        return _chw_uint8(image, f"{self.name} sample {index}")


class _Indexed(Dataset):
    def __init__(self, source: ImageSource, indices: range):
        self.source, self.indices = source, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor]:
        return self.indices[i], self.source[self.indices[i]]


def _collate(items: list[tuple[int, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    shapes = {tuple(img.shape) for _, img in items}
    if len(shapes) > 1:
        raise ValueError(f"images of one reference set must share a size (crop them first, e.g. with dip-prep); "
                         f"found {sorted(shapes)} among indices {[i for i, _ in items][:8]}")
    return torch.tensor([i for i, _ in items]), torch.stack([img for _, img in items])


# ----------------------------------------------------------------------------------------------------
# Statistics of an image source (collective over the ranks)
# ----------------------------------------------------------------------------------------------------


def pr_indices(num_images: int, size: int = PR_REFERENCE_SIZE) -> np.ndarray:
    """Evenly spaced image indices whose pool features are kept for precision/recall."""
    return np.unique(np.linspace(0, num_images - 1, min(size, num_images)).round().astype(np.int64))


@torch.no_grad()
def image_stats(source: ImageSource, inception: InceptionFeatures, *, batch_size: int = 100,
                num_workers: int = 0, pr_size: int = PR_REFERENCE_SIZE, name: str = "",
                progress: bool = True, collective: bool = True,
                keep_images: bool = True) -> ReferenceStats | None:
    """Statistics of every image of `source`, each image once; rank r takes a contiguous slice. With
    keep_images, the precision/recall images themselves come back too (ADM's arr_0).

    Collective (unless collective=False, which makes one process do it all): call on every rank.
    Returns the statistics on rank 0, None on the others."""
    rank, world_size = world() if collective else (0, 1)
    n = len(source)
    if n < 2:
        raise ValueError(f"reference {name or source}: needs at least 2 images, has {n}")
    mine = range(rank * n // world_size, (rank + 1) * n // world_size)
    keep = pr_indices(n, pr_size)
    device = inception.device
    pool, spatial = Moments(POOL_DIM, device), Moments(SPATIAL_DIM, device)
    kept: list[torch.Tensor] = []
    kept_images: list[torch.Tensor] = []
    loader = DataLoader(_Indexed(source, mine), batch_size=batch_size, num_workers=num_workers,
                        collate_fn=_collate)
    desc = f"reference features ({name})" if world_size == 1 else f"reference features ({name}, rank 0 of {world_size})"
    size = None
    for idx, images in tqdm(loader, desc=desc, unit="batch", disable=not progress or rank != 0, dynamic_ncols=True):
        size = size or tuple(images.shape[1:])
        if tuple(images.shape[1:]) != size:
            raise ValueError(f"images of one reference set must share a size (crop them first, e.g. with "
                             f"dip-prep); {name}: found {tuple(images.shape[1:])} at index {int(idx[0])}, "
                             f"{size} before")
        f = inception(images)
        pool.add(f["pool"])
        spatial.add(f["spatial"])
        sel = torch.from_numpy(np.isin(idx.numpy(), keep))
        kept.append(f["pool"][sel.to(f["pool"].device)].cpu())
        if keep_images:
            kept_images.append(images[sel].permute(0, 2, 3, 1).contiguous())  # (k, H, W, 3) uint8
    local = torch.cat(kept) if kept else torch.zeros(0, POOL_DIM)
    local_images = torch.cat(kept_images) if kept_images else None
    if world_size > 1:
        pool.all_reduce()
        spatial.all_reduce()
        counts = [int(np.sum((keep >= r * n // world_size) & (keep < (r + 1) * n // world_size)))
                  for r in range(world_size)]
        pr = gather_rows(local, counts)
        if keep_images:
            shape = broadcast_object(tuple(size) if size else None)
            if local_images is None:
                local_images = torch.zeros((0, shape[1], shape[2], shape[0]), dtype=torch.uint8)
            pr_images = gather_rows(local_images, counts)
    else:
        pr, pr_images = local, local_images
    if rank != 0:
        return None
    mu, sigma = pool.mean_cov()
    mu_s, sigma_s = spatial.mean_cov()
    return ReferenceStats(mu, sigma, mu_s, sigma_s, pr.numpy(), num_images=pool.n, source=name,
                          images=pr_images.numpy() if keep_images and pr_images is not None else None)


# ----------------------------------------------------------------------------------------------------
# ADM reference batch
# ----------------------------------------------------------------------------------------------------

_EXPECTED = {"mu": (POOL_DIM,), "sigma": (POOL_DIM, POOL_DIM), "mu_s": (SPATIAL_DIM,),
             "sigma_s": (SPATIAL_DIM, SPATIAL_DIM)}


def read_npz_reference(path: str | Path, load_images: bool = True) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """The statistics arrays of an ADM-style .npz (validated) and its arr_0 images (None when absent or
    not asked for: the members of an .npz are read one by one, so checking the statistics is cheap)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"reference file {path} does not exist; the ADM ImageNet 256 reference batch "
                                f"is at {ADM_REFERENCE_URL}")
    try:
        npz = np.load(path, allow_pickle=False)
    except Exception as err:
        raise ValueError(f"reference file {path} is not a readable .npz ({err})") from err
    with npz:
        keys = set(npz.files)
        if not ({"mu", "sigma"} <= keys or "arr_0" in keys):
            raise ValueError(f"reference file {path} has keys {sorted(keys)}; expected mu and sigma (Inception "
                             f"pool statistics) and/or arr_0 (uint8 NHWC images), as ADM's reference batches")
        arrays = {}
        for key, shape in _EXPECTED.items():
            if key in keys:
                a = npz[key]
                if a.shape != shape:
                    what = "spatial (mixed_6/conv) features" if key.endswith("_s") else "pool_3 features"
                    raise ValueError(f"reference file {path}: '{key}' has shape {a.shape}, expected {shape} "
                                     f"(Inception {what}, as in ADM's reference batches)")
                if not np.isfinite(a).all():
                    raise ValueError(f"reference file {path}: '{key}' holds NaN or infinite values")
                arrays[key] = a.astype(np.float64)
        if ("mu" in arrays) != ("sigma" in arrays) or ("mu_s" in arrays) != ("sigma_s" in arrays):
            raise ValueError(f"reference file {path} has {sorted(arrays)}: mu needs sigma and mu_s needs sigma_s")
        if "pool_features" in keys:
            p = npz["pool_features"]
            if p.ndim != 2 or p.shape[1] != POOL_DIM:
                raise ValueError(f"reference file {path}: 'pool_features' has shape {p.shape}, expected "
                                 f"(K, {POOL_DIM})")
            arrays["pool_features"] = p.astype(np.float32)
        if "num_images" in keys:
            arrays["num_images"] = npz["num_images"]
        images = None
        if "arr_0" in keys and load_images:
            images = npz["arr_0"]
            if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
                raise ValueError(f"reference file {path}: 'arr_0' is {images.dtype} {images.shape}, expected uint8 "
                                 f"images (N, H, W, 3) as in ADM's reference batches")
    return arrays, images


def _writable_dir(preferred: Path, fallback: Path | None) -> Path | None:
    for d in (preferred, fallback):
        if d is None:
            continue
        try:
            d.mkdir(parents=True, exist_ok=True)
            probe = d / f".dip-write-probe-{os.getpid()}"
            probe.touch()
            probe.unlink()
            return d
        except OSError:
            continue
    return None


def npz_reference(path: str | Path, inception: InceptionFeatures, *, cache_dir: str | Path | None = None,
                  batch_size: int = 100, progress: bool = True) -> ReferenceStats:
    """An ADM reference batch (single process). Features of arr_0 are computed once and cached."""
    path = Path(path)
    arrays, images = read_npz_reference(path)
    pool = arrays.get("pool_features")
    if images is not None and (pool is None or "mu" not in arrays or "mu_s" not in arrays):
        cache_name = f"{path.stem}.fid_features-{inception.fingerprint}.npz"
        where = _writable_dir(path.parent, Path(cache_dir) if cache_dir else None)
        cached = where / cache_name if where else None
        if cached is not None and cached.is_file():
            computed, _ = read_npz_reference(cached)
        else:
            stats = image_stats(ArrayImages(images, f"{path.name}:arr_0"), inception, batch_size=batch_size,
                                pr_size=len(images), name=path.name, progress=progress, collective=False,
                                keep_images=False)
            computed = {"mu": stats.mu, "sigma": stats.sigma, "mu_s": stats.mu_s, "sigma_s": stats.sigma_s,
                        "pool_features": stats.pool}
            if cached is not None:
                stats.save(cached, inception.fingerprint)
                log.info("cached the Inception features of %s in %s", path, cached)
        pool = computed["pool_features"]
        for key in _EXPECTED:  # the file's own statistics win; computed ones only fill gaps
            arrays.setdefault(key, computed[key])
    # Our cached files say how many images their statistics cover (arr_0 holds a subset); ADM's batches do not.
    n = int(arrays["num_images"]) if "num_images" in arrays else len(images) if images is not None else -1
    return ReferenceStats(arrays["mu"], arrays["sigma"], arrays.get("mu_s"), arrays.get("sigma_s"), pool,
                          num_images=n if n >= 0 else None, source=str(path))


# ----------------------------------------------------------------------------------------------------
# Dispatch
# ----------------------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """$DIP_CACHE_DIR/eval when set (one variable for every cache of ours), else ~/.cache/dip_scale."""
    base = os.environ.get("DIP_CACHE_DIR")
    return Path(base) / "eval" if base else Path.home() / ".cache" / "dip_scale"


def _download(url: str, dest: Path) -> bool:
    """Fetch the file at url (s3:// or local) to dest, atomically; False when there is no such file."""
    store, name = open_parent(url)
    try:
        store.download(name, dest)
    except NotFound:
        return False
    return True


def _on_rank0(fn, what: str):
    """Run fn on rank 0 only; every rank raises if it failed (the others would otherwise wait forever)."""
    result, error = None, None
    if world()[0] == 0:
        try:
            result = fn()
        except Exception as err:
            error = err
    failed = broadcast_object(None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    if failed:
        raise RuntimeError(f"rank 0 could not load {what}: {failed}")
    return result


def check_local_reference(spec: str) -> Path:
    """A local reference that is not an .npz must be a folder: say whether it is missing or of the wrong kind."""
    expected = (f"expected an ADM reference .npz ({ADM_REFERENCE_URL}), a folder of MDS shards (with index.json), "
                f"an s3:// shard prefix, or a folder of images")
    folder = Path(spec)
    if folder.is_file():
        raise ValueError(f"reference {spec} is a file but not an .npz; {expected}")
    if not folder.is_dir():
        raise FileNotFoundError(f"reference {spec} does not exist; {expected}")
    return folder


def load_reference(spec: str, inception: InceptionFeatures, *, cache_dir: str | Path | None = None,
                   batch_size: int = 100, num_workers: int = 0, progress: bool = True) -> ReferenceStats | None:
    """Reference statistics from an ADM .npz, MDS shards (folder or s3:// prefix) or an image folder.

    Collective: call on every rank (dataset statistics are computed by all of them). Returns the
    statistics on rank 0 and None on the other ranks."""
    spec = str(spec)
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    remote = spec.startswith("s3://")
    # s3:// sources: the local side of the cache, one folder per URL
    local_copy = cache_dir / "references" / hashlib.sha256(spec.encode()).hexdigest()[:16]

    if spec.endswith(".npz"):
        def load_npz():
            path = local_copy / Path(spec).name if remote else Path(spec)
            if remote and not path.is_file() and not _download(spec, path):
                raise FileNotFoundError(f"reference {spec} does not exist")
            return npz_reference(path, inception, cache_dir=cache_dir, batch_size=batch_size, progress=progress)

        return _on_rank0(load_npz, spec)

    if remote:
        source, folder = ShardImages(spec), local_copy
    else:
        folder = check_local_reference(spec)
        source = ShardImages(spec) if (folder / "index.json").is_file() else ImageFolder(folder)

    # The cache lives next to the data: in the data folder (or, if that is read-only, the cache folder);
    # for s3:// shards, next to the shards in the bucket, with a local copy.
    cache_name = f"fid_stats-{inception.fingerprint}.npz"
    remote_cache = f"{spec.rstrip('/')}/{cache_name}" if remote else None

    def find_cached():
        where = _writable_dir(folder, cache_dir / "references")
        if where is None:
            return None, None
        path = where / cache_name
        if not path.is_file() and remote_cache:
            _download(remote_cache, path)
        if path.is_file():
            stats = npz_reference(path, inception)
            if stats.num_images == len(source):
                stats.source = spec
                return stats, where
            log.warning("ignoring cached statistics %s: made from %s images, the source now has %d", path,
                        stats.num_images, len(source))
        return None, where

    cached, where = _on_rank0(find_cached, f"the cached statistics of {spec}") or (None, None)
    if broadcast_object(cached is not None):
        return cached
    stats = image_stats(source, inception, batch_size=batch_size, num_workers=num_workers, name=spec,
                        progress=progress)
    if stats is not None:
        stats.source = spec
        if where is not None:
            stats.save(where / cache_name, inception.fingerprint)
            log.info("cached the reference statistics of %s in %s", spec, where / cache_name)
            if remote_cache:
                try:
                    store, name = open_parent(remote_cache)
                    store.upload(where / cache_name, name)
                except (OSError, StoreUnavailable) as err:  # a read-only bucket: the next job computes them again
                    log.warning("could not store the statistics next to the shards at %s: %s", remote_cache, err)
    return stats
