"""The wandb compatibility shim against the installed wandb, and the run id that keeps one wandb run per
training run. Training with wandb on, end to end, is covered by tests/test_recipes.py."""

from __future__ import annotations

import pytest

from dip_scale.recipe import load_recipe
from dip_scale.train.loggers import restore_run_get_url, wandb_run_id
from tests.train.launch import TINY


def test_composer_can_ask_the_installed_wandb_for_the_run_url(tmp_path, monkeypatch):
    """What Composer 0.32.1's WandBLogger.init does after wandb.init: `wandb.run.get_url()`."""
    import wandb
    from wandb.sdk.wandb_run import Run

    # As wandb 0.29 and later have it, whatever this wandb (or an earlier test's shim) left in place.
    monkeypatch.delattr(Run, "get_url", raising=False)
    assert restore_run_get_url() is True
    assert restore_run_get_url() is False  # idempotent
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = wandb.init(project="shim", mode="offline", dir=str(tmp_path))
    try:
        assert run.get_url() == run.url  # None offline, and no AttributeError
    finally:
        run.finish()


def test_one_wandb_id_per_run_and_place():
    recipe = load_recipe(TINY)
    other = load_recipe(TINY, ["run_name=other"])
    assert wandb_run_id(recipe, "s3://b/runs") == wandb_run_id(load_recipe(TINY), "s3://b/runs")
    assert wandb_run_id(recipe, "s3://b/runs") != wandb_run_id(other, "s3://b/runs")
    assert wandb_run_id(recipe, "s3://b/runs") != wandb_run_id(recipe, "/scratch/runs")


@pytest.mark.parametrize("mode", ["disabled"])
def test_no_logger_when_wandb_is_off(mode):
    from dip_scale.train.loggers import wandb_logger

    recipe = load_recipe(TINY, [f"logging.wandb.mode={mode}", "logging.wandb.enabled=true"])
    assert wandb_logger(recipe, "/x", "/x") is None
    assert wandb_logger(load_recipe(TINY, ["logging.wandb.enabled=false"]), "/x", "/x") is None
