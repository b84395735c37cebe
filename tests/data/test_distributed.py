"""Several ranks, as real processes with the environment a launcher gives them (RANK, WORLD_SIZE,
LOCAL_RANK, LOCAL_WORLD_SIZE, a gloo process group): each epoch is the dataset exactly once across ranks,
and with num_canonical_nodes fixed the global batches do not depend on the number of nodes, including
after resuming a one-node run's checkpointed state on two nodes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from dip_scale.data import build_dataloader

REPO = Path(__file__).resolve().parents[2]
BATCH_PER_RANK = {1: 8, 2: 4}  # global batch 8 whatever the world size

# One rank: joins the process group (as Composer would), then reads one epoch per requested run and prints
# each run's batches of sample indices.
_RANK = """
import json, sys
import torch.distributed as dist
from dip_scale.data import build_dataloader
config = json.loads(sys.argv[1])
dist.init_process_group("gloo")
runs = []
for run, state in enumerate(config["states"]):
    loader = build_dataloader(remote=config["remote"], local=f"{config['local']}-{run}", batch_size=config["batch"],
                              num_workers=0, shuffle=True, shuffle_seed=11, num_canonical_nodes=2,
                              return_index=True, drop_last=False)
    if state is not None:
        loader.dataset.load_state_dict(state)
    runs.append([indices.tolist() for _, _, indices in loader])
    del loader
dist.barrier()
print(json.dumps(runs))
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _node_tmpdir(path: Path) -> str:
    """A temp folder for a second simulated node on this machine.

    Both "nodes" share this machine's /dev/shm, where each node's local leader picks a free Streaming prefix
    by scanning; scanning at the same moment, two leaders would pick the same one (separate machines never
    collide). Streaming skips prefixes whose lock file exists in the temp folder, so marking prefixes
    0-999 taken here gives the second node prefixes of its own.
    """
    path.mkdir()
    for prefix in range(1000):
        (path / f"{prefix:06d}_barrier_filelock").touch()
    return str(path)


def _run_ranks(remote: str, locals_: list[str], local_world_size: int, states: list,
               tmp_path: Path) -> list[list[list[list[int]]]]:
    """Start 2 ranks; returns runs[rank][run][batch] = sample indices."""
    port = _free_port()
    processes = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank % local_world_size),
               "LOCAL_WORLD_SIZE": str(local_world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        if local_world_size == 1 and rank == 1:
            env["TMPDIR"] = _node_tmpdir(tmp_path / "node1-tmp")
        config = {"remote": remote, "local": locals_[rank], "batch": BATCH_PER_RANK[2], "states": states}
        processes.append(subprocess.Popen([sys.executable, "-c", _RANK, json.dumps(config)], cwd=REPO, env=env,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = []
    for process in processes:
        out, err = process.communicate(timeout=300)
        assert process.returncode == 0, err
        outputs.append(json.loads(out.strip().splitlines()[-1]))
    return outputs


def _one_rank_epoch(remote: str, local: str, state: dict | None = None) -> tuple[list[list[int]], object]:
    loader = build_dataloader(remote=remote, local=local, batch_size=BATCH_PER_RANK[1], num_workers=0, shuffle=True,
                              shuffle_seed=11, num_canonical_nodes=2, return_index=True, drop_last=False)
    if state is not None:
        loader.dataset.load_state_dict(state)
    return [indices.tolist() for _, _, indices in loader], loader


def test_two_ranks_on_one_node_see_the_dataset_once(synthetic_dataset: Callable[..., str], tmp_path: Path) -> None:
    remote = synthetic_dataset(num_images=48)
    shared_cache = str(tmp_path / "cache")  # one node: both ranks share the node's cache folder
    (rank0,), (rank1,) = _run_ranks(remote, [shared_cache, shared_cache], local_world_size=2, states=[None],
                                      tmp_path=tmp_path)
    seen = [i for batch in rank0 + rank1 for i in batch]
    assert sorted(seen) == list(range(48))
    assert len(rank0) == len(rank1) == 6


def test_order_does_not_depend_on_the_node_count(synthetic_dataset: Callable[..., str], tmp_path: Path) -> None:
    remote = synthetic_dataset(num_images=48)
    reference, loader = _one_rank_epoch(remote, str(tmp_path / "one-node"))
    assert sorted(i for batch in reference for i in batch) == list(range(48))
    # A checkpoint of the one-node run after 2 global batches, as Composer saves it.
    state = loader.dataset.state_dict(num_samples=16, from_beginning=True)
    del loader

    # Two nodes (one rank each, own cache folders): a fresh epoch, and one resumed from that state.
    ranks = _run_ranks(remote, [str(tmp_path / "node0"), str(tmp_path / "node1")], local_world_size=1,
                       states=[None, state], tmp_path=tmp_path)
    fresh = [sorted(a + b) for a, b in zip(ranks[0][0], ranks[1][0])]
    resumed = [sorted(a + b) for a, b in zip(ranks[0][1], ranks[1][1])]
    assert fresh == [sorted(batch) for batch in reference]
    assert resumed == [sorted(batch) for batch in reference[2:]]
