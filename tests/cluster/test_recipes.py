"""Every recipe in recipes/ trains as written, shrunk only in size: one test per file, so a new recipe is
covered without editing this one.

What a run here has in common with a user's run of the same file: wandb on in the recipe's mode (offline),
REPA with a DINOv2 ViT-B/14 file in the official format and the real loading path (the torch hub cache),
EMA, checkpoints (to the S3 server on loopback where the recipe saves to s3://), a rerun that resumes,
sample grids, and the scheduled evaluation in the recipe's mode: `slurm` recipes submit cluster/eval_fid.sh
to the local Slurm of tests/cluster, `local` ones evaluate in-process.

What differs, and only in size (SIZE_KEYS): a small trunk of the same kind (depth 2, width 64; the head's
kind and patch size as written) with the synthetic data's 10 classes, batch 4, 6 steps (3, then a rerun to
6), every interval scaled to those steps, 2 sampler steps, a class-balanced evaluation of 20 samples, one
data worker. The CPU keys (CPU_KEYS):
fp32 instead of bf16 (Composer allows only fp32 on CPU) and torch.compile with the CPU-cheap `aot_eager`
backend instead of inductor (the same regional compilation, without code generation). The location keys
(LOCATION_KEYS): where the data, checkpoints, reference and job script are.

A second test checks that each tiny twin (recipes/*_tiny_cpu.yaml) differs from the paper recipe it names in
its first line only in those keys.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dip_scale.recipe import load_recipe, model_config
from tests.cluster.conftest import REPO, venv_env
from tests.wandb_files import read_offline_runs

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

RECIPES = sorted((REPO / "recipes").glob("*.yaml"))
SIZE_KEYS = {
    "model.preset", "model.depth", "model.hidden_size", "model.num_heads", "model.detailer_width", "model.num_classes",
    "objective.repa.block", "data.image_size", "data.num_workers", "data.num_canonical_nodes",
    "train.global_batch_size", "train.max_steps", "train.device_microbatch_size",
    "checkpoint.every", "checkpoint.keep_last", "checkpoint.milestones",
    "logging.log_every", "logging.sample_every", "logging.sample_steps", "logging.sample_classes",
    "eval.every", "eval.num_samples", "eval.batch_size", "sampler.steps",
}
CPU_KEYS = {"train.precision", "train.compile_backend", "train.device"}
LOCATION_KEYS = {"run_name", "data.remote", "data.shuffle_seed", "checkpoint.save_folder", "checkpoint.local_folder",
                 "eval.reference", "eval.script"}
STEPS = 6
EVAL_SAMPLES = 20  # two a class: the evaluation's code path at any N; its number is not looked at


# ----------------------------------------------------------------------------------------------------
# What the recipes need: weights in the torch hub cache, data at each resolution, a reference
# ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def torch_home(tmp_path_factory) -> Path:
    """$TORCH_HOME with the two weight files the recipes look for in the hub cache: DINOv2 ViT-B/14 (random
    values, the official names and shapes) and torch-fidelity's Inception (random He-initialised values)."""
    from dip_scale.diffusion.repa import DINOV2_VITB14_FILE, DINOv2ViT
    from dip_scale.eval.inception import WEIGHTS_FILENAME, write_random_weights

    home = tmp_path_factory.mktemp("torch-home")
    checkpoints = home / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(DINOv2ViT().state_dict(), checkpoints / DINOV2_VITB14_FILE)
    write_random_weights(checkpoints / WEIGHTS_FILENAME)
    return home


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Synthetic MDS shards at any resolution, made once each."""
    from data_prep.synthetic import write_synthetic_shards

    made: dict[int, Path] = {}

    def at(resolution: int) -> Path:
        if resolution not in made:
            out = tmp_path_factory.mktemp("data") / f"synthetic-{resolution}"
            write_synthetic_shards(str(out), num_images=32, resolution=resolution, seed=0)
            made[resolution] = out
        return made[resolution]

    return at


def write_reference(path: Path, resolution: int) -> None:
    """An ADM-format reference batch: arr_0 (uint8 NHWC images), mu/sigma (Inception pool statistics)."""
    from dip_scale.data import synthetic_image

    rng = np.random.default_rng(0)
    features = rng.normal(size=(4096, 2048)).astype(np.float64) * 0.1
    images = np.stack([synthetic_image(i, resolution, seed=5)[0] for i in range(16)])
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, arr_0=images, mu=features.mean(0), sigma=np.cov(features, rowvar=False))


def size_overrides(recipe) -> list[str]:
    """SIZE_KEYS and CPU_KEYS values that shrink `recipe` to a few CPU seconds a step (see the docstring)."""
    net = model_config(recipe)
    out = [f"train.global_batch_size={min(recipe.train.global_batch_size, 4)}", f"train.max_steps={STEPS}",
           "checkpoint.every=3", "logging.log_every=1", "logging.sample_steps=2", "sampler.steps=2",
           f"data.num_workers={min(recipe.data.num_workers, 1)}"]
    if net.num_classes > 10:  # the synthetic data's classes; an evaluation is a multiple of the class count
        out.append("model.num_classes=10")
        if recipe.logging.sample_classes:
            out.append("logging.sample_classes=[0,1,2,3,4,5,6,7]")
    net = dataclasses.replace(net, num_classes=min(net.num_classes, 10))
    if net.hidden_size > 128:
        out += ["model.depth=2", "model.hidden_size=64", "model.num_heads=2"]
        if net.detailer_head != "none":
            out.append("model.detailer_width=8")
    if recipe.objective.repa.enabled:
        out.append(f"objective.repa.block={min(recipe.objective.repa.block, 2)}")
    if recipe.checkpoint.milestones:
        out.append("checkpoint.milestones=[3]")
    if recipe.logging.sample_every:
        out.append("logging.sample_every=3")
    if recipe.eval.every:
        n = net.num_classes * max(1, EVAL_SAMPLES // net.num_classes)
        out += [f"eval.every={STEPS}", f"eval.num_samples={n}", f"eval.batch_size={min(recipe.eval.batch_size, n)}"]
    if recipe.train.precision == "bf16":
        out.append("train.precision=fp32")
    if recipe.train.compile:
        out.append("train.compile_backend=aot_eager")
    return out


# ----------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------


def run_train(cwd: Path, recipe: Path, overrides: list[str], env: dict, steps: int) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "dip_scale.train", str(recipe), *overrides, f"train.max_steps={steps}"]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"$ {' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def same_runs(paths: list[Path]) -> list[tuple[Path, ...]]:
    """Recipes grouped by the run they shrink to (dip_l_256 and dip_xl_256 differ in the trunk's size alone, so
    their shrunk runs are the same run): one training per group covers every file of it."""
    groups: dict[str, list[Path]] = {}
    for path in paths:
        recipe = load_recipe(path)
        shrunk = flat(load_recipe(path, size_overrides(recipe)))
        key = repr(sorted((k, v) for k, v in shrunk.items() if k not in ("run_name", "model.preset")))
        groups.setdefault(key, []).append(path)
    return [tuple(g) for g in groups.values()]


def flat(obj, prefix: str = "") -> dict:
    if dataclasses.is_dataclass(obj):
        out = {}
        for f in dataclasses.fields(obj):
            out.update(flat(getattr(obj, f.name), f"{prefix}{f.name}."))
        return out
    return {prefix[:-1]: obj}


GROUPS = same_runs(RECIPES)


@pytest.mark.parametrize("paths", GROUPS, ids=["+".join(p.name for p in g) for g in GROUPS])
def test_recipe_trains_checkpoints_resumes_and_evaluates_as_written(paths, slurm, s3_server, torch_home, shards,
                                                                     tmp_path):
    path = paths[0]
    recipe = load_recipe(path)
    cwd = tmp_path / "work"
    cwd.mkdir()
    overrides = size_overrides(recipe)
    overrides.append(f"data.remote={shards(recipe.data.image_size[0])}")
    remote = str(recipe.checkpoint.save_folder or "").startswith("s3://")
    save = s3_server.fresh_url("runs") if remote else str(cwd / "runs")
    overrides += [f"checkpoint.save_folder={save}", f"checkpoint.local_folder={cwd / 'local'}"]
    run_dir = (cwd / "local" if remote else Path(save)) / recipe.run_name
    if recipe.eval.every:
        overrides.append(f"eval.script={REPO / 'cluster' / 'eval_fid.sh'}")
        reference = cwd / recipe.eval.reference  # as written: a path relative to where the job is started
        if recipe.eval.reference.endswith(".npz"):
            write_reference(reference, recipe.data.image_size[0])
        else:
            shutil.copytree(shards(recipe.data.image_size[0]), reference)
    env = {**os.environ, "SLURM_CONF": slurm.env["SLURM_CONF"], **venv_env(), "TORCH_HOME": str(torch_home),
           "OMP_NUM_THREADS": "1",
           "SBATCH_GPUS_PER_NODE": "0", "DIP_CACHE_DIR": str(tmp_path / "cache"),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}

    run_train(cwd, path, overrides, env, steps=3)
    resumed = run_train(cwd, path, overrides, env, steps=STEPS)
    assert "resuming" in resumed.stderr and "from step 3" in resumed.stderr, resumed.stderr[-3000:]

    # Checkpoints, EMA and the recipe inside them.
    from dip_scale.checkpoint import find_resume_checkpoint, read_weights
    from dip_scale.storage import open_store

    store = open_store(f"{save}/{recipe.run_name}") if remote else None
    step, load_path = find_resume_checkpoint(run_dir, store)
    assert step == STEPS
    weights, _ = read_weights(Path(load_path).parent, trust=True)
    ema = {k[8:]: v for k, v in weights.items() if k.startswith("ema_net.")}
    live = {k[4:]: v for k, v in weights.items() if k.startswith("net.")}
    assert ema.keys() == live.keys() and any(not torch.equal(ema[k], live[k]) for k in ema)

    # Sample grids.
    if recipe.logging.sample_every:
        assert sorted(p.name for p in (run_dir / "samples").glob("*.png")) == ["step-000000003.png",
                                                                              "step-000000006.png"]

    # wandb: one run across the two processes, the recipe as a nested config, the metrics of every step.
    if recipe.logging.wandb.enabled and recipe.logging.wandb.mode != "disabled":
        runs = read_offline_runs(run_dir / "wandb")
        training = [r for r in runs.values() if r.config.get("run_name") == recipe.run_name]
        assert len(training) == 1 and len(training[0].files) == 2, sorted(runs)
        run = training[0]
        assert run.config["train"]["max_steps"] == STEPS and run.config["model"]["preset"] == recipe.model.preset
        for step in range(1, STEPS + 1):  # wandb's step of update k is k - 1 (Composer's); see README, wandb
            row = run.history[step - 1]
            for key in ("loss/train/total", "train/lr", "train/grad_norm", "throughput/images_per_sec"):
                assert key in row, (step, sorted(row))
        if recipe.objective.repa.enabled:
            assert "loss/train/repa" in run.history[STEPS - 1]
        if recipe.logging.sample_every:
            assert run.history[3]["samples/ema/_type"] in ("image-file", "images/separated")

    # The scheduled evaluation, in the recipe's mode.
    if recipe.eval.every:
        import json

        if recipe.eval.mode == "slurm":
            jobs = [json.loads(line) for line in (run_dir / "eval" / "jobs.jsonl").read_text().splitlines()]
            assert [j["step"] for j in jobs] == [STEPS] and "job_id" in jobs[0], jobs
            final = slurm.wait(int(jobs[0]["job_id"]), timeout=600)
            log = next(cwd.glob(f"*-{jobs[0]['job_id']}.out")).read_text()
            assert final["JobState"] == "COMPLETED", f"{final}\n{log[-4000:]}"
        table = (run_dir / "eval" / "results.csv").read_text()
        assert f"\n{STEPS}," in table, table
        if recipe.logging.wandb.enabled and recipe.logging.wandb.mode != "disabled":
            evals = [r for r in read_offline_runs(run_dir / "wandb").values()
                     if any("eval/fid" in row for row in r.history.values())]
            assert evals, "no wandb run holds eval/fid"
            rows = [row for r in evals for row in r.history.values() if "eval/fid" in row]
            assert [row["eval/step"] for row in rows] == [STEPS]


# ----------------------------------------------------------------------------------------------------
# Tiny twins
# ----------------------------------------------------------------------------------------------------

TWINS = [p for p in RECIPES if p.name.endswith("_tiny_cpu.yaml")]


@pytest.mark.parametrize("twin", TWINS, ids=[p.name for p in TWINS])
def test_tiny_twin_differs_from_its_paper_recipe_only_in_size(twin):
    named = re.search(r"twin of (\S+\.yaml)", twin.read_text().splitlines()[0])
    assert named, f"{twin.name}: the first line must name the paper recipe ('... twin of dip_xl_256.yaml ...')"
    paper, tiny = flat(load_recipe(REPO / "recipes" / named.group(1))), flat(load_recipe(twin))
    differ = sorted(k for k in paper if paper[k] != tiny[k])
    assert set(differ) <= SIZE_KEYS | CPU_KEYS | LOCATION_KEYS, [
        f"{k}: {paper[k]!r} -> {tiny[k]!r}" for k in differ if k not in SIZE_KEYS | CPU_KEYS | LOCATION_KEYS]
