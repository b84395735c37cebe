"""Reference statistics: the ADM .npz (validated, used as is, arr_0 features cached), statistics from our
shards equal to those of the same images on disk, caching next to the data, and s3:// sources."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data_prep.synthetic import write_synthetic_shards
from dip_scale.data import synthetic_image
from dip_scale.eval.metrics import mean_cov
from dip_scale.eval.stats import Moments, load_reference, read_npz_reference
from tests.eval.images import blobs

NUM, SIZE = 6, 32


@contextmanager
def count_forwards(inception):
    """How many images the Inception network sees inside the block."""
    seen = [0]
    hook = inception.net.register_forward_hook(lambda m, args, out: seen.__setitem__(0, seen[0] + args[0].shape[0]))
    try:
        yield seen
    finally:
        hook.remove()


def assert_same_stats(a, b, exact=True):
    for key in ("mu", "sigma", "mu_s", "sigma_s", "pool"):
        x, y = getattr(a, key), getattr(b, key)
        if exact:
            np.testing.assert_array_equal(x, y, err_msg=key)
        else:
            np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-9, err_msg=key)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    write_synthetic_shards(str(out), NUM, SIZE, seed=0, encoding="png")
    return out


@pytest.fixture(scope="module")
def same_images_on_disk(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pngs")
    for i in range(NUM):
        Image.fromarray(synthetic_image(i, SIZE, seed=0)[0]).save(folder / f"{i:05d}.png")
    return folder


# ----------------------------------------------------------------------------------------------------
# ADM reference batch
# ----------------------------------------------------------------------------------------------------


def write_npz(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize("key,shape,expected", [
    ("sigma", (2048, 2047), r"'sigma' has shape \(2048, 2047\), expected \(2048, 2048\)"),
    ("mu", (1, 2048), r"'mu' has shape \(1, 2048\), expected \(2048,\)"),
    ("mu_s", (2048,), r"'mu_s' has shape \(2048,\), expected \(2023,\)"),
])
def test_reference_of_the_wrong_shape_is_named(tmp_path, key, shape, expected):
    arrays = {"mu": np.zeros(2048), "sigma": np.eye(2048), "mu_s": np.zeros(2023), "sigma_s": np.eye(2023)}
    arrays[key] = np.zeros(shape)
    path = write_npz(tmp_path / "ref.npz", **arrays)
    with pytest.raises(ValueError, match=rf"reference file .*ref.npz: {expected}"):
        read_npz_reference(path)


def test_reference_files_that_are_not_references(tmp_path):
    with pytest.raises(ValueError, match=r"has keys \['x'\]; expected mu and sigma .* and/or arr_0"):
        read_npz_reference(write_npz(tmp_path / "a.npz", x=np.zeros(3)))
    with pytest.raises(ValueError, match=r"'arr_0' is float64 \(2, 8, 8, 3\), expected uint8 images"):
        read_npz_reference(write_npz(tmp_path / "b.npz", arr_0=np.zeros((2, 8, 8, 3))))
    with pytest.raises(ValueError, match="mu needs sigma"):
        read_npz_reference(write_npz(tmp_path / "c.npz", mu=np.zeros(2048), arr_0=np.zeros((2, 8, 8, 3), np.uint8)))
    with pytest.raises(ValueError, match="NaN"):
        read_npz_reference(write_npz(tmp_path / "d.npz", mu=np.full(2048, np.nan), sigma=np.eye(2048)))
    (tmp_path / "e.npz").write_text("not a zip")
    with pytest.raises(ValueError, match=r"e.npz is not a readable .npz"):
        read_npz_reference(tmp_path / "e.npz")
    with pytest.raises(FileNotFoundError, match=r"missing.npz does not exist.*VIRTUAL_imagenet256_labeled.npz"):
        read_npz_reference(tmp_path / "missing.npz")


def test_adm_batch_statistics_are_used_as_they_are_and_arr_0_features_are_cached(tmp_path, inception):
    rng = np.random.default_rng(0)
    mu, mu_s = rng.normal(size=2048).astype(np.float32), rng.normal(size=2023)
    sigma, sigma_s = np.eye(2048, dtype=np.float32) * 0.5, np.eye(2023) * 0.25
    images = blobs(5, SIZE, seed=3)
    path = write_npz(tmp_path / "VIRTUAL_test.npz", arr_0=images, mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)
    with count_forwards(inception) as seen:
        ref = load_reference(str(path), inception, cache_dir=tmp_path / "cache", progress=False)
    assert seen[0] == 5
    assert ref.mu.dtype == np.float64 and np.array_equal(ref.mu, mu.astype(np.float64))
    assert np.array_equal(ref.sigma, sigma.astype(np.float64)) and np.array_equal(ref.sigma_s, sigma_s)
    direct = inception(torch.from_numpy(images).permute(0, 3, 1, 2))["pool"].numpy()
    np.testing.assert_allclose(ref.pool, direct, rtol=1e-5, atol=1e-6)
    assert ref.num_images == 5
    cached = tmp_path / f"VIRTUAL_test.fid_features-{inception.fingerprint}.npz"
    assert cached.is_file()
    with count_forwards(inception) as seen:
        again = load_reference(str(path), inception, cache_dir=tmp_path / "cache", progress=False)
    assert seen[0] == 0
    assert np.array_equal(again.pool, ref.pool) and np.array_equal(again.mu, ref.mu)


# ----------------------------------------------------------------------------------------------------
# Our data
# ----------------------------------------------------------------------------------------------------


def test_statistics_from_shards_equal_those_of_the_same_images_on_disk(shards, same_images_on_disk, inception,
                                                                         tmp_path):
    from_shards = load_reference(str(shards), inception, cache_dir=tmp_path, batch_size=4, progress=False)
    from_disk = load_reference(str(same_images_on_disk), inception, cache_dir=tmp_path, batch_size=4,
                               progress=False)
    assert from_shards.num_images == from_disk.num_images == NUM
    assert_same_stats(from_shards, from_disk)
    # and they are the plain mean / np.cov of the features
    x = torch.stack([torch.from_numpy(synthetic_image(i, SIZE, 0)[0]).permute(2, 0, 1) for i in range(NUM)])
    feats = inception(x)
    mu, sigma = mean_cov(feats["pool"])
    np.testing.assert_allclose(from_shards.mu, mu, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(from_shards.sigma, sigma, rtol=1e-4, atol=1e-8)
    # cached next to the data; the second call computes nothing
    assert (shards / f"fid_stats-{inception.fingerprint}.npz").is_file()
    with count_forwards(inception) as seen:
        again = load_reference(str(shards), inception, cache_dir=tmp_path, progress=False)
    assert seen[0] == 0
    assert_same_stats(again, from_shards)


def read_like_the_adm_evaluator(path: Path) -> tuple[np.ndarray, tuple, tuple]:
    """What ADM's evaluator (guided-diffusion, evaluations/evaluator.py) takes from --ref_batch: the arr_0
    images, read batch by batch from the zip member arr_0.npy after its .npy header, and mu/sigma and
    mu_s/sigma_s as they are when "mu" is among the keys."""
    import zipfile

    with np.load(path) as obj:
        assert "mu" in list(obj.keys())
        stats, spatial = (obj["mu"], obj["sigma"]), (obj["mu_s"], obj["sigma_s"])
    with zipfile.ZipFile(path) as archive, archive.open("arr_0.npy") as f:
        version = np.lib.format.read_magic(f)
        assert version == (1, 0)
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        assert dtype == np.uint8 and not fortran and len(shape) == 4 and shape[-1] == 3
        per_image = int(np.prod(shape[1:]))
        batches = []
        while chunk := f.read(per_image * 2):  # ADM reads fixed-size batches of raw bytes
            batches.append(np.frombuffer(chunk, dtype=np.uint8).reshape(-1, *shape[1:]))
    return np.concatenate(batches), stats, spatial


def test_cached_statistics_are_an_adm_reference_batch(shards, inception, tmp_path):
    stats = load_reference(str(shards), inception, cache_dir=tmp_path, batch_size=4, progress=False)
    cached = shards / f"fid_stats-{inception.fingerprint}.npz"
    images, (mu, sigma), (mu_s, sigma_s) = read_like_the_adm_evaluator(cached)
    assert images.shape == (NUM, SIZE, SIZE, 3)  # all of them: fewer than the 10,000 of the subset
    expected = np.stack([synthetic_image(i, SIZE, 0)[0] for i in range(NUM)])
    np.testing.assert_array_equal(images, expected)
    np.testing.assert_array_equal(mu, stats.mu)
    np.testing.assert_array_equal(sigma, stats.sigma)
    assert mu.shape == (2048,) and sigma.shape == (2048, 2048) and mu_s.shape == (2023,)
    assert sigma_s.shape == (2023, 2023)


def test_folder_cache_is_redone_when_the_images_change(tmp_path, inception):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, im in enumerate(blobs(3, SIZE, seed=5)):
        Image.fromarray(im).save(folder / f"{i}.png")
    first = load_reference(str(folder), inception, cache_dir=tmp_path / "c", progress=False)
    Image.fromarray(blobs(1, SIZE, seed=6)[0]).save(folder / "3.png")
    with count_forwards(inception) as seen:
        second = load_reference(str(folder), inception, cache_dir=tmp_path / "c", progress=False)
    assert seen[0] == 4 and second.num_images == 4 and first.num_images == 3


def test_images_of_different_sizes_are_refused(tmp_path, inception):
    Image.fromarray(blobs(1, 32, 0)[0]).save(tmp_path / "a.png")
    Image.fromarray(blobs(1, 16, 0)[0]).save(tmp_path / "b.png")
    with pytest.raises(ValueError, match=r"must share a size .*\(3, 16, 16\), \(3, 32, 32\)"):
        load_reference(str(tmp_path), inception, cache_dir=tmp_path / "c", progress=False)
    with pytest.raises(FileNotFoundError, match="expected an ADM reference .npz"):
        load_reference(str(tmp_path / "nowhere"), inception, progress=False)


def test_moments_equal_mean_and_np_cov():
    f = torch.randn(50, 7, generator=torch.Generator().manual_seed(0)) * 3 + 1
    m = Moments(7, torch.device("cpu"))
    for chunk in f.split(8):
        m.add(chunk)
    mu, cov = m.mean_cov()
    np.testing.assert_allclose(mu, f.double().mean(0).numpy(), rtol=1e-12)
    np.testing.assert_allclose(cov, np.cov(f.double().numpy(), rowvar=False), rtol=1e-10)


# ----------------------------------------------------------------------------------------------------
# s3://
# ----------------------------------------------------------------------------------------------------


def test_s3_shards_and_npz(s3_server, shards, inception, tmp_path, monkeypatch):
    monkeypatch.setenv("DIP_CACHE_DIR", str(tmp_path / "job-cache"))
    url = s3_server.fresh_url("eval-shards")
    write_synthetic_shards(url, NUM, SIZE, seed=0, encoding="png")
    local = load_reference(str(shards), inception, cache_dir=tmp_path / "a", progress=False)
    remote = load_reference(url, inception, cache_dir=tmp_path / "b", batch_size=4, progress=False)
    assert_same_stats(remote, local, exact=False)
    cache_key = f"{url.split('/', 3)[3]}/fid_stats-{inception.fingerprint}.npz"
    assert cache_key in s3_server.list_keys(url), "statistics are stored next to the shards"
    # a fresh machine (empty local cache) takes them from the bucket
    with count_forwards(inception) as seen:
        fresh = load_reference(url, inception, cache_dir=tmp_path / "fresh", progress=False)
    assert seen[0] == 0
    assert_same_stats(fresh, remote)

    npz = tmp_path / "ref.npz"
    np.savez(npz, mu=local.mu, sigma=local.sigma)
    npz_url = s3_server.fresh_url("ref") + "/ref.npz"
    s3_server.client().upload_file(str(npz), *npz_url[5:].split("/", 1))
    from_s3 = load_reference(npz_url, inception, cache_dir=tmp_path / "n", progress=False)
    assert np.array_equal(from_s3.sigma, local.sigma) and from_s3.mu_s is None and from_s3.pool is None
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_reference(s3_server.fresh_url("nothing") + "/ref.npz", inception, cache_dir=tmp_path / "n")
