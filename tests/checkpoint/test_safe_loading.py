"""Loading a checkpoint never runs code from it unless told to: Composer's state.pt loads with
torch.load(weights_only=True) and an allowlist of plain data types; a file that needs more is refused, naming
--trust-checkpoint, and the payload of a malicious pickle never runs."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from dip_scale.checkpoint import UntrustedCheckpoint, describe_files, load_model, write_manifest
from dip_scale.models import build_model
from dip_scale.sample import main as dip_sample
from tests.train.launch import train


class Payload:
    """Unpickling this touches a file: what an attacker's code would do instead."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_shards) -> Path:
    root = tmp_path_factory.mktemp("run")
    train([f"data.remote={tiny_shards}", f"checkpoint.save_folder={root}", "train.max_steps=1", "checkpoint.every=1"])
    return root / "dip-tiny-cpu" / "checkpoints" / "step-000000001"


def poisoned_copy(checkpoint: Path, tmp_path: Path, marker: Path) -> Path:
    """The same checkpoint with a payload inside state.pt, and a manifest that matches (it verifies)."""
    folder = tmp_path / "poisoned" / "checkpoints" / checkpoint.name
    shutil.copytree(checkpoint, folder)
    state = torch.load(folder / "state.pt", map_location="cpu", weights_only=False)
    state["state"]["callbacks"] = {"Evil": Payload(marker)}
    torch.save(state, folder / "state.pt")
    write_manifest(folder, 1, describe_files(folder, ["state.pt", "recipe.yaml"]), "state.pt", {})
    return folder


def test_our_own_checkpoint_loads_safely(checkpoint):
    model, info = load_model(str(checkpoint))  # no trust needed: weights_only with the allowlist
    assert info["step"] == 1


def test_malicious_pickle_is_refused_and_never_runs(checkpoint, tmp_path, capsys):
    marker = tmp_path / "pwned"
    folder = poisoned_copy(checkpoint, tmp_path, marker)
    with pytest.raises(UntrustedCheckpoint, match="--trust-checkpoint"):
        load_model(str(folder))
    assert dip_sample([str(folder), "--out", str(tmp_path / "x.png"), "--steps", "1"]) == 2
    assert "--trust-checkpoint" in capsys.readouterr().err
    assert not marker.exists()
    load_model(str(folder), trust=True)  # what the flag does: a full unpickling, payload included
    assert marker.exists()


def test_released_weights_with_a_payload_are_refused(tmp_path):
    from dip_scale.models.official import to_official_state_dict

    marker = tmp_path / "pwned"
    sd = {f"ema_denoiser.{k}": v for k, v in to_official_state_dict(build_model("DiP-tiny/16").state_dict()).items()}
    torch.save({"state_dict": sd, "hyper_parameters": Payload(marker)}, tmp_path / "released.ckpt")
    with pytest.raises(ValueError, match="--trust-checkpoint"):
        load_model(str(tmp_path / "released.ckpt"), official=True)
    assert not marker.exists()


def test_sharded_checkpoints_need_trust(tmp_path, tiny_shards):
    train([f"data.remote={tiny_shards}", f"checkpoint.save_folder={tmp_path}", "train.max_steps=1",
           "checkpoint.every=1", "parallelism.strategy=fsdp", "train.global_batch_size=8"], nproc=2,
          logs=tmp_path / "logs")
    with pytest.raises(UntrustedCheckpoint, match="sharded"):
        load_model(str(tmp_path / "dip-tiny-cpu"))
    assert load_model(str(tmp_path / "dip-tiny-cpu"), trust=True)[1]["step"] == 1
