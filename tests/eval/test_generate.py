"""Class-balanced seeded generation, the rank plan, and 2 real processes (gloo) == 1 process, exactly."""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dip_scale.diffusion.sampler import SamplerConfig
from dip_scale.eval.generate import Plan, check_num_samples, class_labels, gather_rows, generate
from dip_scale.models import build_model
from tests.eval.images import blobs

SAMPLER = SamplerConfig(steps=2, guidance_scale=2.0, guidance_interval=(0.0, 1.0))
SIZE = (32, 32)


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("DiP-tiny/16").eval()  # 10 classes


def run_generate(model, num_samples, batch_size, seed=0):
    images, labels, indices = [], [], []
    for b in generate(model, num_samples=num_samples, seed=seed, sampler=SAMPLER, batch_size=batch_size,
                      device="cpu", image_size=SIZE, progress=False):
        images.append(b.images)
        labels.append(b.labels)
        indices.append(b.indices)
    return torch.cat(images), torch.cat(labels), torch.cat(indices)


def test_labels_are_class_balanced_and_interleaved():
    labels = class_labels(range(30), 10)
    assert torch.equal(labels[:10], torch.arange(10))
    assert torch.bincount(labels, minlength=10).tolist() == [3] * 10


@pytest.mark.parametrize("num_samples,batch_size", [(20, 3), (10, 10), (7, 2), (1, 4)])
@pytest.mark.parametrize("world_size", [1, 2, 3, 5])
def test_plan_covers_every_index_once_in_rank_order(num_samples, batch_size, world_size):
    plan = Plan(num_samples, batch_size, world_size)
    flat = [i for r in range(world_size) for start, end in plan.batches(r) for i in range(start, end)]
    assert flat == list(range(num_samples))
    assert sum(plan.counts()) == num_samples
    # every batch is a global batch [b*B, (b+1)*B), whichever rank makes it
    for r in range(world_size):
        assert all(start % batch_size == 0 for start, _ in plan.batches(r))


def test_num_samples_must_be_divisible_by_the_number_of_classes():
    with pytest.raises(ValueError, match=r"1001.*divisible by the number of classes \(1000\).*use 1000 or 2000"):
        check_num_samples(1001, 1000)
    with pytest.raises(ValueError, match="divisible"):
        next(generate(tiny_model(), num_samples=15, seed=0, sampler=SAMPLER, batch_size=4, device="cpu",
                      image_size=SIZE, progress=False))


def test_generation_is_seeded_balanced_and_independent_of_batch_order():
    model = tiny_model()
    images, labels, indices = run_generate(model, 20, 6)
    assert images.shape == (20, *SIZE, 3) and images.dtype == torch.uint8
    assert torch.equal(indices, torch.arange(20))
    assert torch.equal(labels, torch.arange(20) % 10)
    again, _, _ = run_generate(model, 20, 6)
    assert torch.equal(images, again)
    other_seed, _, _ = run_generate(model, 20, 6, seed=1)
    assert not torch.equal(images, other_seed)
    # the first 10 samples of N=20 are the samples of N=10: sample i depends only on (seed, i)
    first, _, _ = run_generate(model, 10, 6)
    assert torch.equal(first, images[:10])


# ----------------------------------------------------------------------------------------------------
# Two real processes
# ----------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, out: str, cases, stats_case):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        model = tiny_model()
        results = {}
        for num_samples, batch_size in cases:
            plan = Plan(num_samples, batch_size, world_size)
            local_images, local_labels = [], []
            for b in generate(model, num_samples=num_samples, seed=3, sampler=SAMPLER, batch_size=batch_size,
                              device="cpu", image_size=SIZE, progress=False):
                local_images.append(b.images)
                local_labels.append(b.labels)
            imgs = torch.cat(local_images) if local_images else torch.zeros(0, *SIZE, 3, dtype=torch.uint8)
            labs = torch.cat(local_labels) if local_labels else torch.zeros(0, dtype=torch.long)
            # a tiny chunk makes the gather take several rounds
            all_images = gather_rows(imgs, plan.counts(), chunk_bytes=3 * SIZE[0] * SIZE[1] * 3)
            all_labels = gather_rows(labs, plan.counts())
            if rank == 0:
                results[f"images_{num_samples}_{batch_size}"] = all_images.numpy()
                results[f"labels_{num_samples}_{batch_size}"] = all_labels.numpy()
        if stats_case is not None:
            from dip_scale.eval.inception import InceptionFeatures
            from dip_scale.eval.stats import ArrayImages, image_stats

            weights, images = stats_case
            stats = image_stats(ArrayImages(np.load(images), "test"), InceptionFeatures(weights), batch_size=2,
                                pr_size=3, progress=False)
            if rank == 0:
                results.update(mu=stats.mu, sigma=stats.sigma, mu_s=stats.mu_s, sigma_s=stats.sigma_s,
                               pool=stats.pool, n=np.array(stats.num_images))
        if rank == 0:
            np.savez(out, **results)
    finally:
        dist.destroy_process_group()


def run_processes(world_size: int, out: Path, cases, stats_case=None) -> dict:
    mp.start_processes(_worker, args=(world_size, _free_port(), str(out), cases, stats_case), nprocs=world_size,
                       join=True, start_method="spawn")
    with np.load(out) as f:
        return dict(f)


@pytest.mark.slow
def test_two_ranks_make_exactly_the_images_and_statistics_of_one(tmp_path, inception_weights):
    # (20, 3): 7 global batches split 3/4, the last one padded; (10, 10): one batch, rank 1 makes nothing
    cases = [(20, 3), (10, 10)]
    np.save(tmp_path / "images.npy", blobs(5, 32, seed=11))
    stats_case = (str(inception_weights), str(tmp_path / "images.npy"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the workers: CPU kernels may round differently with other thread counts
    try:
        _worker(0, 1, _free_port(), str(tmp_path / "one.npz"), cases, stats_case)
    finally:
        torch.set_num_threads(threads)
    with np.load(tmp_path / "one.npz") as f:
        one = dict(f)
    two = run_processes(2, tmp_path / "two.npz", cases, stats_case)
    for num_samples, batch_size in cases:
        key = f"images_{num_samples}_{batch_size}"
        assert one[key].shape == (num_samples, *SIZE, 3)
        np.testing.assert_array_equal(two[key], one[key])
        np.testing.assert_array_equal(two[f"labels_{num_samples}_{batch_size}"], np.arange(num_samples) % 10)
    # reference statistics: ranks split the images, moments are summed, P/R features gathered in order
    assert int(two["n"]) == int(one["n"]) == 5
    np.testing.assert_array_equal(two["pool"], one["pool"])
    for key in ("mu", "sigma", "mu_s", "sigma_s"):
        np.testing.assert_allclose(two[key], one[key], rtol=1e-9, atol=1e-12)
