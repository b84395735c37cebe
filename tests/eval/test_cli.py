"""dip-eval end to end on a real tiny checkpoint (trained here with the tiny recipe), and its bad-input
errors: a checkpoint that does not exist, a reference of the wrong shape, N not divisible by the classes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dip_scale.eval.cli import checkpoint_location, default_run_dir, main
from tests.eval.images import blobs
from tests.train.launch import PLAIN, TINY

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """Two steps of the tiny CPU recipe through the real trainer; its step-2 checkpoint folder."""
    from composer.utils import dist

    from data_prep.synthetic import write_synthetic_shards
    from dip_scale.recipe import load_recipe
    from dip_scale.train.build import build_trainer

    tmp = tmp_path_factory.mktemp("tiny-run")
    write_synthetic_shards(str(tmp / "data"), 32, 32, seed=0)
    recipe = load_recipe(TINY, [*PLAIN, f"data.remote={tmp / 'data'}", f"checkpoint.save_folder={tmp / 'runs'}",
                                "train.max_steps=2", "checkpoint.every=2", "logging.sample_every=0",
                                "train.global_batch_size=8", "sampler.steps=2"])
    dist.initialize_dist("cpu")
    trainer, paths = build_trainer(recipe)
    trainer.fit()
    trainer.close()
    return paths.local_root / "checkpoints" / "step-000000002"


@pytest.fixture(scope="module")
def reference_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("reference")
    for i, im in enumerate(blobs(10, 32, seed=7)):
        Image.fromarray(im).save(folder / f"{i:03d}.png")
    return folder


def test_end_to_end_on_a_tiny_checkpoint(tiny_checkpoint, reference_folder, inception_weights, tmp_path, capsys):
    npz = tmp_path / "samples.npz"
    run_dir = tiny_checkpoint.parent.parent
    # a run folder stands for its newest checkpoint; the results go next to that checkpoint
    argv = [str(run_dir), "--reference", str(reference_folder), "-n", "10", "--batch-size", "4",
            "--guidance-scale", "1.5", "--inception-weights", str(inception_weights), "--num-workers", "0",
            "--cache-dir", str(tmp_path / "cache"), "--save-npz", str(npz), "--no-progress"]
    assert main(argv) == 0
    result_json = Path(f"{tiny_checkpoint}.eval-n10.json")
    record = json.loads(result_json.read_text())
    assert record["step"] == 2 and record["num_samples"] == 10 and record["seed"] == 0
    assert record["checkpoint"] == str(tiny_checkpoint)
    # the recipe's sampler (2 steps, Euler, interval), the guidance scale from the flag
    assert record["sampler"] == {"steps": 2, "method": "euler", "guidance_scale": 1.5,
                                 "guidance_interval": [0.11, 0.97]}
    m = record["metrics"]
    assert m["fid"] > 0 and m["sfid"] > 0 and m["inception_score"] >= 1.0
    assert 0 <= m["precision"] <= 1 and 0 <= m["recall"] <= 1
    assert record["wall_time_s"] > 0 and record["reference"] == str(reference_folder)
    out = capsys.readouterr().out
    assert f"FID {m['fid']:.4f}" in out
    # the run folder's table and plot
    table = (run_dir / "eval" / "results.csv").read_text().splitlines()
    assert len(table) == 2 and table[1].startswith("2,10,")
    assert (run_dir / "eval" / "fid_vs_step.png").stat().st_size > 1000
    # ADM-compatible samples, class-balanced in index order
    with np.load(npz) as f:
        assert f["arr_0"].shape == (10, 32, 32, 3) and f["arr_0"].dtype == np.uint8
        assert f["arr_1"].tolist() == list(range(10))
    # the reference statistics were cached next to the reference images for the next evaluation
    assert list(reference_folder.glob("fid_stats-*.npz"))


@pytest.mark.slow
def test_two_ranks_under_the_composer_launcher_make_the_images_of_one(tiny_checkpoint, reference_folder,
                                                                        inception_weights, tmp_path):
    import socket

    import torch

    from dip_scale.checkpoint import load_model
    from dip_scale.eval.generate import generate

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launcher = Path(sys.executable).parent / "composer"
    cmd = [str(launcher), "-n", "2", "--master_port", str(port), "--stderr", str(tmp_path / "rank{rank}.err"),
           "-m", "dip_scale.eval.cli", str(tiny_checkpoint), "--reference", str(reference_folder), "-n", "20",
           "--batch-size", "3", "--inception-weights", str(inception_weights), "--num-workers", "0",
           "--save-npz", str(tmp_path / "two.npz"), "--out", str(tmp_path / "two.json"),
           "--run-dir", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "cache"), "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    errors = "".join(p.read_text()[-2000:] for p in sorted(tmp_path.glob("rank*.err")))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:] + errors
    record = json.loads((tmp_path / "two.json").read_text())
    assert record["world_size"] == 2 and record["metrics"]["fid"] > 0

    model, info = load_model(str(tiny_checkpoint))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = torch.cat([b.images for b in generate(model, num_samples=20, seed=0, batch_size=3,
                                                    sampler=info["sampler"], device="cpu",
                                                    image_size=info["image_size"], progress=False)])
    finally:
        torch.set_num_threads(threads)
    with np.load(tmp_path / "two.npz") as f:
        np.testing.assert_array_equal(f["arr_0"], one.numpy())
        assert f["arr_1"].tolist() == [i % 10 for i in range(20)]


def test_results_of_s3_checkpoints_go_next_to_them_in_the_bucket():
    run = "s3://bucket/runs/xl"
    assert checkpoint_location(run, "/tmp/dl/checkpoints/step-000000100") == f"{run}/checkpoints/step-000000100"
    step = f"{run}/checkpoints/step-000000100"
    assert checkpoint_location(step, "/tmp/dl/checkpoints/step-000000100") == step
    assert checkpoint_location("runs/xl", "runs/xl/checkpoints/step-000000100") == "runs/xl/checkpoints/step-000000100"
    assert default_run_dir(step) is None


def test_n_not_divisible_by_the_number_of_classes(tiny_checkpoint, reference_folder, inception_weights, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([str(tiny_checkpoint), "--reference", str(reference_folder), "-n", "15",
              "--inception-weights", str(inception_weights), "--no-progress"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "dip-eval: error: the number of samples (15) must be divisible by the number of classes (10)" in err
    assert "use 10 or 20" in err


def test_checkpoint_that_does_not_exist(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([str(tmp_path / "runs/x/checkpoints/step-000000100"), "--reference", str(tmp_path)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "dip-eval: error: checkpoint" in err and "step-000000100 does not exist" in err


def test_reference_of_the_wrong_shape(tmp_path, capsys):
    checkpoint = tmp_path / "ck"
    checkpoint.mkdir()
    np.savez(tmp_path / "ref.npz", mu=np.zeros(2048), sigma=np.zeros((1000, 1000)))
    with pytest.raises(SystemExit) as exit_:
        main([str(checkpoint), "--reference", str(tmp_path / "ref.npz")])
    assert exit_.value.code == 2
    assert "ref.npz: 'sigma' has shape (1000, 1000), expected (2048, 2048)" in capsys.readouterr().err


def test_console_script_help_has_examples():
    exe = Path(sys.executable).parent / "dip-eval"
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True, check=True).stdout
    assert "torchrun --nproc_per_node 8 -m dip_scale.eval.cli" in out and "--save-npz" in out
    assert "VIRTUAL_imagenet256_labeled.npz" in out
