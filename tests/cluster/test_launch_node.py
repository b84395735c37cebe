"""cluster/launch_node.sh, the per-node launch that train.sh runs with srun, without Slurm: two invocations
on loopback acting as node 0 and node 1 (2 ranks each) form one process group of 4 ranks and train the
tiny recipe to the same losses and weights as one node with 4 ranks.

Each "node" gets a private /dev/shm (a mount namespace) and its own TMPDIR, as real nodes have: Streaming
registers every dataset in shared memory, and two nodes' leaders sharing one /dev/shm would claim the
same slot.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.cluster.conftest import REPO, TINY, free_port, model_tensors
from tests.train.launch import PLAIN

pytestmark = pytest.mark.slow

LAUNCH = REPO / "cluster" / "launch_node.sh"
STEPS = 4
PRIVATE_SHM = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
               'mount -t tmpfs tmpfs /dev/shm && exec "$0" "$@"']


@pytest.fixture(scope="module")
def private_shm():
    probe = subprocess.run([*PRIVATE_SHM, "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        reason = f"cannot give each simulated node its own /dev/shm (unshare --mount as root): {probe.stderr.strip()}"
        if os.environ.get("DIP_REQUIRE_SLURM") == "1":
            pytest.fail(reason)
        pytest.skip(reason)


def start_node(tmp: Path, shards: Path, save: Path, nnodes: int, node_rank: int, ranks: int, port: int):
    node = tmp / f"{save.name}-node{node_rank}"
    (node / "tmp").mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
    env.update(NNODES=str(nnodes), NODE_RANK=str(node_rank), GPUS_PER_NODE=str(ranks), MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(port), LOG_DIR=str(node / "logs"), PYTHON=sys.executable, TMPDIR=str(node / "tmp"),
               PYTHONUNBUFFERED="1")
    cmd = [*PRIVATE_SHM, "bash", str(LAUNCH), str(TINY), *PLAIN, f"data.remote={shards}",
           f"checkpoint.save_folder={save}",
           f"train.max_steps={STEPS}", f"checkpoint.every={STEPS}", "logging.log_every=1", "logging.sample_every=0"]
    out = open(node / "stdout.txt", "w")
    return subprocess.Popen(cmd, cwd=tmp, env=env, stdout=out, stderr=subprocess.STDOUT), node


def finish(nodes, timeout=600) -> None:
    for proc, node in nodes:
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            for p, _ in nodes:
                p.kill()
            raise
    for proc, node in nodes:
        logs = "".join(f"\n--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted((node / "logs").glob("*")))
        out = (node / "stdout.txt").read_text()[-5000:]
        assert proc.returncode == 0, f"{node.name} exited {proc.returncode}:\n{out}{logs}"


def run_summary(save: Path):
    run = save / "dip-tiny-cpu"
    losses = {json.loads(line)["step"]: json.loads(line)["loss/train/total"]
              for line in (run / "metrics.jsonl").read_text().splitlines()}
    checkpoint = run / "checkpoints" / f"step-{STEPS:09d}"
    world = json.loads((checkpoint / "manifest.json").read_text())["world_size"]
    return losses, model_tensors(checkpoint), world


def test_two_nodes_of_two_ranks_train_like_one_node_of_four(private_shm, shards, tmp_path):
    port = free_port()
    two = [start_node(tmp_path, shards, tmp_path / "two", 2, r, 2, port) for r in (0, 1)]
    finish(two)
    # Node 0 holds global ranks 0-1, node 1 ranks 2-3; each node's first rank prints to the launcher's stdout.
    assert sorted(p.name for p in (two[0][1] / "logs").iterdir()) == ["rank1.err", "rank1.out"]
    assert sorted(p.name for p in (two[1][1] / "logs").iterdir()) == ["rank3.err", "rank3.out"]
    assert f"complete at step {STEPS}" in (two[0][1] / "stdout.txt").read_text()

    finish([start_node(tmp_path, shards, tmp_path / "one", 1, 0, 4, free_port())])

    losses_two, weights_two, world_two = run_summary(tmp_path / "two")
    losses_one, weights_one, world_one = run_summary(tmp_path / "one")
    assert world_two == world_one == 4
    assert sorted(losses_two) == list(range(1, STEPS + 1))
    assert losses_two == pytest.approx(losses_one, rel=1e-6)
    # The same data and seeds on the same 4 ranks; only the order of the gradient all-reduce's additions
    # may differ with the topology (differences of float32 rounding, ~1e-8 here).
    assert weights_two.keys() == weights_one.keys()
    for name in weights_one:
        torch.testing.assert_close(weights_two[name], weights_one[name], rtol=1e-5, atol=1e-6, msg=name)
