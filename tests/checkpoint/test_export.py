"""Weights people can share: a checkpoint of any strategy -> dip-export -> the same network, bitwise (its
samples too), loaded from the folder or from a Hugging Face hub cache entry, offline."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from dip_scale.checkpoint import load_model
from dip_scale.eval.generate import sample_images
from dip_scale.export import main as dip_export
from tests.train.launch import train

pytestmark = pytest.mark.slow

STRATEGIES = {
    "ddp": ([], 1),
    "fsdp": (["parallelism.strategy=fsdp"], 2),
    "deepspeed": (["parallelism.strategy=deepspeed", "parallelism.deepspeed.stage=3"], 2),
}


@pytest.fixture(scope="module", params=list(STRATEGIES))
def run_dir(request, tmp_path_factory, tiny_shards):
    options, nproc = STRATEGIES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    train([f"data.remote={tiny_shards}", f"checkpoint.save_folder={root}", "train.max_steps=2", "checkpoint.every=2",
           "train.global_batch_size=8", *options], nproc=nproc, logs=root / "logs")
    return root / "dip-tiny-cpu"


def samples(model, info) -> torch.Tensor:
    labels = torch.tensor([0, 3, 7, 9])
    return sample_images(model, range(4), labels, seed=5, sampler=info["sampler"].merged(steps=3),
                         image_size=info["image_size"], device=torch.device("cpu"), autocast_dtype=None,
                         null_class=info["num_classes"])


def test_export_loads_back_bitwise(run_dir, tmp_path):
    out = tmp_path / "export"
    assert dip_export([str(run_dir), str(out), "--trust-checkpoint"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    original, info = load_model(str(run_dir), trust=True)
    exported, exported_info = load_model(str(out))
    assert original.state_dict().keys() == exported.state_dict().keys()
    assert all(torch.equal(v, exported.state_dict()[k]) for k, v in original.state_dict().items())
    assert exported_info["sampler"] == info["sampler"] and exported_info["image_size"] == info["image_size"]
    assert exported_info["step"] == info["step"] == 2
    assert torch.equal(samples(original, info), samples(exported, exported_info))
    config = json.loads((out / "config.json").read_text())
    assert config["model"]["depth"] == 2 and config["weights"] == "ema"


def test_hub_cache_entry_loads_offline(run_dir, tmp_path, monkeypatch):
    """The layout huggingface_hub keeps: hub/models--ORG--NAME/{refs/main, snapshots/<commit>/...}."""
    export = tmp_path / "export"
    assert dip_export([str(run_dir), str(export), "--trust-checkpoint"]) == 0
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf-home" / "hub" / "models--dip-test--tiny"
    shutil.copytree(export, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-home" / "hub"))
    model, info = load_model("hf://dip-test/tiny")
    direct, _ = load_model(str(export))
    assert all(torch.equal(v, direct.state_dict()[k]) for k, v in model.state_dict().items())
    assert info["source"].endswith(commit)
    with pytest.raises(FileNotFoundError, match="not in the local Hugging Face cache"):
        load_model("hf://dip-test/absent")
