"""ScheduledEval through the real trainer (the tiny CPU recipe, built by dip_scale.train.build): local mode
writes results for the expected steps and leaves training unchanged; process mode runs dip-eval beside
training, waits for it at the end and starts again on resume what a stopped run lost; slurm mode submits
cluster/eval_fid.sh to a real local Slurm for the newest checkpoint, and the job adds its row."""

from __future__ import annotations

import gc
import json
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from tests.cluster.conftest import slurm  # noqa: F401  (the real one-node Slurm fixture)
from tests.eval.images import blobs, make_test_inception_weights
from tests.train.launch import PLAIN, TINY

ROOT = Path(__file__).resolve().parents[3]
STEPS = 4


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("inception") / "test-inception.pth"
    make_test_inception_weights(path)
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("reference")
    for i, im in enumerate(blobs(10, 32, seed=7)):
        Image.fromarray(im).save(folder / f"{i:03d}.png")
    return folder


def shards(folder: Path) -> Path:
    from data_prep.synthetic import write_synthetic_shards

    write_synthetic_shards(str(folder), 32, 32, seed=0)
    return folder


def train(tmp: Path, overrides: list[str]):
    """The tiny recipe through build_trainer + fit, in this process; returns the run folder."""
    from composer.utils import dist

    from dip_scale.recipe import load_recipe
    from dip_scale.train.build import build_trainer

    recipe = load_recipe(TINY, [*PLAIN, f"data.remote={shards(tmp / 'data')}", f"checkpoint.save_folder={tmp / 'runs'}",
                                f"train.max_steps={STEPS}", "logging.sample_every=0", "train.global_batch_size=8",
                                "sampler.steps=2", "sampler.guidance_scale=1.5", *overrides])
    dist.initialize_dist("cpu")
    trainer, paths = build_trainer(recipe)
    try:
        trainer.fit()
    finally:
        trainer.close()
        del trainer
        gc.collect()  # lets Streaming release the data folder's shared memory
    return paths.local_root


def eval_overrides(reference: Path, weights: Path, mode: str = "local", every: int = 2) -> list[str]:
    return [f"eval.every={every}", f"eval.mode={mode}", "eval.num_samples=10", "eval.batch_size=5",
            f"eval.reference={reference}", f"eval.inception_path={weights}"]


def final_net(run_dir: Path) -> dict[str, torch.Tensor]:
    state = torch.load(run_dir / "checkpoints" / f"step-{STEPS:09d}" / "state.pt", map_location="cpu",
                       weights_only=False)["state"]["model"]
    return {k: v for k, v in state.items() if k.startswith(("net.", "ema_net."))}


def test_local_mode_writes_results_for_the_expected_steps_and_leaves_training_alone(tmp_path, reference,
                                                                                     inception_weights):
    run = train(tmp_path / "with", [f"checkpoint.every={STEPS}", *eval_overrides(reference, inception_weights)])
    folder = run / "eval"
    for step in (2, 4):
        record = json.loads((folder / f"step-{step:09d}.n10.json").read_text())
        assert record["step"] == step and record["mode"] == "local" and record["num_samples"] == 10
        assert record["sampler"]["steps"] == 2 and record["sampler"]["guidance_scale"] == 1.5
        assert record["metrics"]["fid"] > 0 and record["metrics"]["sfid"] > 0
    lines = (folder / "results.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in lines[1:]] == ["2", "4"]
    assert (folder / "fid_vs_step.png").stat().st_size > 1000
    assert "| 2 | 10 |" in (folder / "results.md").read_text()

    # Sampling the EMA mid-training draws no random numbers from the training streams.
    plain = train(tmp_path / "without", [f"checkpoint.every={STEPS}"])
    with_eval, without = final_net(run), final_net(plain)
    assert with_eval.keys() == without.keys()
    for key in with_eval:
        assert torch.equal(with_eval[key], without[key]), key


def test_n_that_does_not_split_over_the_classes_fails_before_training(tmp_path, reference, inception_weights):
    """The recipe's own checks (tests/recipe/test_validate.py) and the start's (tests/train/test_preflight.py)
    cover the settings; a callback built by hand still refuses an N it cannot balance before the first step."""
    from composer import Trainer
    from torch.utils.data import DataLoader, TensorDataset

    from dip_scale.diffusion.flow import FlowMatching
    from dip_scale.models import build_model
    from dip_scale.train.callbacks.fid_eval import ScheduledEval
    from dip_scale.train.module import DiPComposerModel

    model = DiPComposerModel(build_model("DiP-tiny/16"), FlowMatching(num_classes=10), seed=0)
    data = TensorDataset(torch.zeros(4, 3, 32, 32, dtype=torch.uint8), torch.zeros(4, dtype=torch.long),
                         torch.arange(4))
    callback = ScheduledEval(every=2, num_samples=15, reference=str(reference), inception_path=str(inception_weights))
    trainer = Trainer(model=model, train_dataloader=DataLoader(data, batch_size=2), max_duration="2ba",
                      optimizers=torch.optim.SGD(model.parameters(), lr=0.0),
                      callbacks=[callback], device="cpu", progress_bar=False)
    with pytest.raises(ValueError, match=r"number of samples \(15\) must be divisible by the number of classes"):
        trainer.fit()
    assert int(trainer.state.timestamp.batch) == 0


def test_process_mode_evaluates_beside_training_and_the_run_waits_for_it(tmp_path, reference, inception_weights):
    """Two ranks through Composer's launcher, as users start them: the dip-eval that rank 0 starts must not
    take the launcher's variables (WORLD_SIZE=2, ...) for a process group of its own, and retention must not
    delete a checkpoint while its evaluation reads it."""
    from tests.train import launch

    run = tmp_path / "runs" / "tiny"
    proc = launch.train([f"data.remote={shards(tmp_path / 'data')}", f"checkpoint.save_folder={tmp_path / 'runs'}",
                  "run_name=tiny", f"train.max_steps={STEPS}", "train.global_batch_size=8", "sampler.steps=2",
                  "sampler.guidance_scale=1.5", "checkpoint.every=2", "checkpoint.keep_last=1",
                  *eval_overrides(reference, inception_weights, mode="process")], nproc=2, logs=tmp_path / "logs")
    folder = run / "eval"
    jobs = [json.loads(line) for line in (folder / "jobs.jsonl").read_text().splitlines()]
    started = [j for j in jobs if "pid" in j]
    assert [(j["step"], Path(j["checkpoint"]).name) for j in started] == [(2, "step-000000002"),
                                                                         (4, "step-000000004")], jobs
    assert started[0]["command"][1:3] == ["-m", "dip_scale.eval.cli"]
    for step in (2, 4):  # finished when training returned, written where local mode writes
        path = folder / f"step-{step:09d}.n10.json"
        assert path.is_file(), (folder / f"step-{step:09d}.n10.log").read_text()[-3000:]
        record = json.loads(path.read_text())
        assert record["step"] == step and record["mode"] == "dip-eval" and record["metrics"]["fid"] > 0
        assert record["sampler"]["steps"] == 2 and record["sampler"]["guidance_scale"] == 1.5
    rows = [line.split(",")[:2] for line in (folder / "results.csv").read_text().splitlines()[1:]]
    assert sorted(rows) == [["2", "10"], ["4", "10"]]
    # keep_last=1: step 2's checkpoint outlived the save of step 4 while its evaluation read it, then went
    assert sorted(p.name for p in (run / "checkpoints").glob("step-*")) == ["step-000000004"]
    said = proc.stdout + proc.stderr  # rank 0's log: each result as its process ends
    assert "step 4: FID" in said and ", beside training" in said, said[-3000:]
    # Step 4 came while step 2's dip-eval was still starting: one evaluation at a time, the next one queued.
    assert "the evaluation of step 4 waits for that of step 2" in said and {"step": 4, "queued": True}.items() <= \
        jobs[1].items(), jobs


def test_process_mode_starts_again_on_resume_an_evaluation_the_stopped_run_lost(tmp_path, reference,
                                                                                 inception_weights, caplog):
    import subprocess

    run = train(tmp_path, ["checkpoint.every=2"])
    # The stopped start had started dip-eval on step 2 and was killed with it: a pid that is gone, no result.
    gone = subprocess.Popen(["true"])
    gone.wait()
    (run / "eval").mkdir()
    (run / "eval" / "jobs.jsonl").write_text(json.dumps(
        {"step": 2, "checkpoint": str((run / "checkpoints" / "step-000000002").resolve()), "pid": gone.pid}) + "\n")
    with caplog.at_level("WARNING", logger="dip_scale.train.callbacks.fid_eval"):
        train(tmp_path, ["checkpoint.every=2", "train.max_steps=6",
                         *eval_overrides(reference, inception_weights, mode="process")])
    assert "the evaluation of step 2 did not finish; starting it again" in caplog.text
    jobs = [json.loads(line) for line in (run / "eval" / "jobs.jsonl").read_text().splitlines()]
    assert [j["step"] for j in jobs if "pid" in j] == [2, 2, 6]  # not 4: it had passed step 2; 6 is the next
    for step in (2, 6):
        assert json.loads((run / "eval" / f"step-{step:09d}.n10.json").read_text())["step"] == step


@pytest.mark.slurm
@pytest.mark.slow
def test_slurm_mode_submits_eval_fid_for_the_newest_checkpoint(slurm, tmp_path, reference, inception_weights,  # noqa: F811
                                                                 monkeypatch):
    from dip_scale.eval.inception import InceptionFeatures
    from dip_scale.eval.stats import load_reference

    load_reference(str(reference), InceptionFeatures(inception_weights), progress=False)  # cached for the jobs
    # Submit from a scratch folder (job logs land there) that sees the project's cluster/ scripts.
    work = tmp_path / "work"
    work.mkdir()
    (work / "cluster").symlink_to(ROOT / "cluster")
    monkeypatch.chdir(work)
    for key, value in {**slurm.env, "VENV": sys.prefix, "SBATCH_GPUS_PER_NODE": "0",
                       "PYTHONPATH": str(ROOT)}.items():
        monkeypatch.setenv(key, value)

    t0 = time.monotonic()
    run = train(tmp_path, ["checkpoint.every=2", *eval_overrides(reference, inception_weights, mode="slurm")])
    assert time.monotonic() - t0 < 120, "submitting must not hold training up"
    jobs = [json.loads(line) for line in (run / "eval" / "jobs.jsonl").read_text().splitlines()]
    assert [(j["step"], Path(j["checkpoint"]).name) for j in jobs] == [(2, "step-000000002"), (4, "step-000000004")]
    assert all("error" not in j for j in jobs), jobs
    assert jobs[1]["command"][:4] == ["sbatch", "--parsable", "cluster/eval_fid.sh", jobs[1]["checkpoint"]]
    for j in jobs:
        state = slurm.wait(int(j["job_id"]), timeout=600)
        log = work / f"dip-eval-{j['job_id']}.out"
        assert state["JobState"] == "COMPLETED", log.read_text() if log.exists() else state
    rows = [line.split(",") for line in (run / "eval" / "results.csv").read_text().splitlines()[1:]]
    assert [(r[0], r[1]) for r in rows] == [("2", "10"), ("4", "10")]
    record = json.loads(Path(f"{jobs[1]['checkpoint']}.eval-n10.json").read_text())
    assert record["step"] == 4 and record["mode"] == "dip-eval" and record["metrics"]["fid"] > 0
    assert record["sampler"] == {"steps": 2, "method": "euler", "guidance_scale": 1.5,
                                 "guidance_interval": [0.11, 0.97]}
