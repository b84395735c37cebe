"""dip-sample: our checkpoint (run folder, checkpoint folder) and the released format -> PNG grid and
ADM-evaluator .npz; clear errors for bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from dip_scale.checkpoint import load_model
from dip_scale.models import build_model
from dip_scale.models.official import to_official_state_dict
from dip_scale.sample import main
from tests.train.launch import train


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from data_prep.synthetic import write_synthetic_shards

    shards = tmp_path_factory.mktemp("data") / "synthetic-32"
    write_synthetic_shards(str(shards), num_images=64, resolution=32, seed=0)
    root = tmp_path_factory.mktemp("runs")
    train([f"data.remote={shards}", f"checkpoint.save_folder={root}", "train.max_steps=3", "checkpoint.every=3",
           "logging.sample_every=0"])
    return root / "dip-tiny-cpu"


def test_load_model_reads_the_ema_weights(run_dir):
    model, info = load_model(str(run_dir))
    assert info["step"] == 3 and info["image_size"] == (32, 32) and info["num_classes"] == 10
    state = torch.load(run_dir / "checkpoints" / "step-000000003" / "state.pt", weights_only=False)["state"]["model"]
    ema = {k[len("ema_net."):]: v for k, v in state.items() if k.startswith("ema_net.")}
    assert all(torch.equal(model.state_dict()[k], v) for k, v in ema.items())


def test_grid_and_npz(run_dir, tmp_path):
    out, npz = tmp_path / "grid.png", tmp_path / "s.npz"
    assert main([str(run_dir), "--classes", "0", "4", "9", "--per-class", "2", "--steps", "3", "--out", str(out),
                 "--npz", str(npz), "--num-samples", "20"]) == 0
    assert Image.open(out).size == (3 * 32, 2 * 32)
    data = np.load(npz)
    assert data["arr_0"].shape == (20, 32, 32, 3) and data["arr_0"].dtype == np.uint8
    assert sorted(np.bincount(data["arr_1"]).tolist()) == [2] * 10
    # Same seed, same images.
    again = tmp_path / "again.png"
    main([str(run_dir), "--classes", "0", "4", "9", "--per-class", "2", "--steps", "3", "--out", str(again)])
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(again)))


def test_released_weights_through_the_converter(tmp_path):
    net = build_model("DiP-tiny/16")
    torch.save({"state_dict": {f"ema_denoiser.{k}": v for k, v in to_official_state_dict(net.state_dict()).items()}},
               tmp_path / "released.ckpt")
    out = tmp_path / "released.png"
    assert main([str(tmp_path / "released.ckpt"), "--official", "--classes", "1", "--per-class", "1", "--steps", "2",
                 "--out", str(out)]) == 0
    assert out.is_file()


def test_bad_input(run_dir, tmp_path, capsys):
    assert main([str(tmp_path / "missing"), "--out", str(tmp_path / "x.png")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    assert main([str(run_dir), "--classes", "12", "--out", str(tmp_path / "x.png")]) == 2
    assert "outside [0, 10)" in capsys.readouterr().err
