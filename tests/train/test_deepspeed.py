"""DeepSpeed ZeRO-1/2/3 under the Composer Trainer, with 2 real ranks (gloo, the composer launcher).

Each stage trains the tiny recipe and follows a single-process ddp run with the same global batch and seed:
losses and gradient norms agree to 1e-5 relative (seen: 1e-7 and 1e-6; what differs is float summation
order), and the final weights and EMA (read back from the engine's sharded checkpoint) to 1e-5. A ZeRO-3 run
restarted from its step-2 checkpoint ends bitwise equal to the uninterrupted run: weights, EMA, optimizer
moments and losses. A NaN loss makes the engine refuse the update on every rank, and the run stops with
that state checkpointed. Nothing is compiled: TORCH_EXTENSIONS_DIR stays empty.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from tests.train.launch import final_model, losses, train
from tests.train.runs import assert_bitwise_equal

pytestmark = pytest.mark.slow

RUN = "dip-tiny-cpu"
STEPS = 4
COMMON = [f"train.max_steps={STEPS}", "checkpoint.every=2", "logging.sample_every=0", "logging.log_every=1"]
DEEPSPEED = ["parallelism.strategy=deepspeed"]
STAGES = {
    "zero1": ["parallelism.deepspeed.stage=1"],
    "zero2+offload+accum": ["parallelism.deepspeed.stage=2", "parallelism.deepspeed.offload_optimizer=true",
                            "train.device_microbatch_size=4"],
    # Below 1,000 elements a parameter stays whole on every rank: the tiny model then has both kinds.
    "zero3+ac": ["parallelism.deepspeed.stage=3", "parallelism.deepspeed.param_persistence_threshold=1000",
                 "train.activation_checkpointing=true"],
}


def metrics(run_dir, key: str) -> dict[int, float]:
    return {r["step"]: r[key] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


def train_zero(root, shards, options, env: dict | None = None, check: bool = True):
    """2 ranks; fails if anything was compiled on the way. Returns the launcher's process (rank 0's output)."""
    extensions = root / "torch_extensions"
    extensions.mkdir(parents=True)
    proc = train([f"data.remote={shards}", f"checkpoint.save_folder={root}", *COMMON, *DEEPSPEED, *options], nproc=2,
                 logs=root / "logs", env={"TORCH_EXTENSIONS_DIR": str(extensions), **(env or {})}, check=check)
    assert not any(extensions.iterdir()), f"DeepSpeed compiled an op: {sorted(extensions.rglob('*'))}"
    return proc


@pytest.fixture(scope="module")
def single(tmp_path_factory, tiny_shards):
    root = tmp_path_factory.mktemp("single")
    train([f"data.remote={tiny_shards}", f"checkpoint.save_folder={root}", *COMMON])
    return root / RUN


@pytest.fixture(scope="module")
def zero3(tmp_path_factory, tiny_shards):
    root = tmp_path_factory.mktemp("zero3")
    train_zero(root, tiny_shards, STAGES["zero3+ac"])
    return root / RUN


def assert_same_engine_state(a, b) -> None:
    """Two checkpoint folders hold the same fp32 master weights and Adam moments, rank by rank, bitwise."""
    for rank in range(2):
        name = f"deepspeed/zero/zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"
        x, y = (torch.load(f / name, map_location="cpu", weights_only=False)["optimizer_state_dict"] for f in (a, b))
        assert_bitwise_equal(x, y, f"rank {rank}'s partition of the optimizer")


@pytest.mark.parametrize("stage", list(STAGES))
def test_zero_matches_one_process(request, tmp_path, tiny_shards, single, stage):
    if stage == "zero3+ac":
        run = request.getfixturevalue("zero3")
    else:
        train_zero(tmp_path, tiny_shards, STAGES[stage])
        run = tmp_path / RUN
    for key in ("loss/train/total", "train/grad_norm"):
        ref, got = metrics(single, key), metrics(run, key)
        assert sorted(got) == list(range(1, STEPS + 1))
        for step in ref:
            assert got[step] == pytest.approx(ref[step], rel=1e-5), (key, step, got, ref)
    a, b = final_model(single, STEPS), final_model(run, STEPS)
    assert set(a) == set(b) and any(k.startswith("ema_net.") for k in b)
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=0, atol=1e-5), (k, (a[k] - b[k]).abs().max())


def test_zero3_resume_equals_uninterrupted(tmp_path, tiny_shards, zero3):
    """The uninterrupted run, as a run killed after its step-2 checkpoint would have left it, run again."""
    copy = tmp_path / RUN
    shutil.copytree(zero3, copy)
    shutil.rmtree(copy / "checkpoints" / f"step-{STEPS:09d}")
    (copy / "latest").write_text(f"step-{2:09d}")
    proc = train_zero(tmp_path, tiny_shards, STAGES["zero3+ac"])
    assert f"resuming {RUN} from step 2" in proc.stdout + proc.stderr, proc.stderr[-3000:]

    assert losses(copy) == losses(zero3)  # steps 3 and 4 again, bitwise
    a, b = final_model(zero3, STEPS), final_model(copy, STEPS)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)  # weights and EMA
    assert_same_engine_state(zero3 / "checkpoints" / f"step-{STEPS:09d}", copy / "checkpoints" / f"step-{STEPS:09d}")


def test_nonfinite_loss_stops_with_the_last_good_state(tmp_path, tiny_shards):
    """Step 3's loss made NaN (NonFiniteGuard's test hook) with the optimizer state offloaded: the engine refuses
    the update on both ranks, the run stops (exit 3) and its checkpoint equals the one of step 2."""
    options = [*STAGES["zero2+offload+accum"], "train.max_steps=3"]
    proc = train_zero(tmp_path, tiny_shards, options, env={"DIP_TEST_NONFINITE_STEP": "3"}, check=False)
    out = proc.stdout + proc.stderr
    assert "step 3: non-finite loss or gradient" in out and "exited with code 3" in out, out[-3000:]
    run = tmp_path / RUN
    assert math.isnan(metrics(run, "loss/train/total")[3]) and metrics(run, "train/grad_norm")[3] == math.inf
    a, b = final_model(run, 2), final_model(run, 3)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)  # weights and EMA
    assert_same_engine_state(run / "checkpoints" / f"step-{2:09d}", run / "checkpoints" / f"step-{3:09d}")
