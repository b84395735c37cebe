"""The recipe loader: every shipped recipe validates; bad recipes fail with an error naming the file and key."""

from __future__ import annotations

import subprocess
import sys

import pytest

from dip_scale.recipe import ConfigError, check_world_size, load_recipe
from tests.train.launch import ROOT, TINY

RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.name for r in RECIPES])
def test_every_recipe_dry_runs(recipe):
    out = subprocess.run([sys.executable, "-m", "dip_scale.train", str(recipe), "--dry-run"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "run_name:" in out.stdout and "parameters" in out.stdout


def test_the_paper_recipe_is_the_paper():
    r = load_recipe(ROOT / "recipes" / "dip_xl_256.yaml")
    assert r.model.preset == "DiP-XL/16" and r.train.global_batch_size == 256
    assert r.optim.lr == 1e-4 and r.ema_decay == 0.9999 and r.objective.repa.enabled
    assert r.objective.repa.weight == 0.5 and r.objective.repa.block == 8
    assert r.train.precision == "bf16" and r.train.compile
    assert r.data.remote.startswith("s3://")


def test_overrides_and_interpolation():
    r = load_recipe(TINY, ["seed=7", "optim.lr=3e-4", "data.image_size=[64,32]"])
    assert r.seed == 7 and r.data.shuffle_seed == 7  # shuffle_seed: ${seed}
    assert r.optim.lr == 3e-4 and r.data.image_size == [64, 32]


@pytest.mark.parametrize("override,message", [
    ("train.global_batchsize=8", "unknown key 'train.global_batchsize'"),
    ("train.global_batch_size=eight", "bad value for 'train.global_batch_size'"),
    ("parallelism.strategy=zero", "parallelism.strategy='zero' is not allowed"),
    ("parallelism.deepspeed.stage=4", "parallelism.deepspeed.stage=4 is not allowed"),
    ("data.image_size=[30,32]", "not divisible by the model's patch size 16"),
    ("model.preset=DiP-H/16", "model.preset='DiP-H/16' is not allowed"),
    ("objective.repa.enabled=true;objective.repa.block=9",
     "objective.repa.block=9 must be within the model's 2 blocks"),
    ("train.precision=fp8", "train.precision='fp8' is not allowed"),
])
def test_bad_recipes_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")) as err:
        load_recipe(TINY, override.split(";"))
    assert str(TINY) in str(err.value)


def test_batch_must_divide_over_ranks():
    r = load_recipe(TINY, ["train.global_batch_size=12"])
    assert check_world_size(r, 4) == (3, 1)
    with pytest.raises(ConfigError, match="not divisible by the world size 8"):
        check_world_size(r, 8)
    r = load_recipe(TINY, ["train.global_batch_size=16", "train.device_microbatch_size=4"])
    assert check_world_size(r, 2) == (8, 2)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")
