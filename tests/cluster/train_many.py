"""Train several recipes one after another in one process group, so that a multi-host test pays the start of
its processes (interpreters, imports, rendezvous) once for a whole strategy matrix. cluster/launch_node.sh runs
it on every node in place of the trainer's entry point:

    MODULE=tests.cluster.train_many cluster/launch_node.sh PLAN.json

PLAN.json: {"recipe": path, "root": folder, "runs": {name: [key=value, ...], ...}}. Run `name` trains the recipe
with its overrides into <root>/<name>/<run_name>/ through the real build_trainer and Composer Trainer, exactly
as `python -m dip_scale.train` does (resume included), with two additions:
- each node caches the data in a folder of its own per run (Streaming registers a cache folder once per
  process and node);
- every node's first rank records its network interface's counters at the end of every step into
  <run folder>/net-node<N>.json: {step: [received bytes, sent bytes]}. By then the step's last collective (the
  preemption flag's all-reduce, which every rank enters only after its gradient reduction) has completed on
  this rank, so the difference between two steps is what those steps exchanged (plus that small all-reduce).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
from pathlib import Path

from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist


def interface_bytes(name: str) -> tuple[int, int]:
    """(received, sent) bytes of interface `name` in this process's network namespace."""
    for line in Path("/proc/self/net/dev").read_text().splitlines()[2:]:
        iface, _, fields = line.partition(":")
        if iface.strip() == name:
            values = fields.split()
            return int(values[0]), int(values[8])
    raise KeyError(f"no interface {name} in /proc/self/net/dev")


class InterfaceCounters(Callback):
    def __init__(self, path: Path, interface: str):
        self.path = path
        self.interface = interface
        self.steps: dict[int, tuple[int, int]] = {}

    def fit_start(self, state: State, logger: Logger):
        self.steps[int(state.timestamp.batch)] = interface_bytes(self.interface)

    def batch_end(self, state: State, logger: Logger):
        self.steps[int(state.timestamp.batch)] = interface_bytes(self.interface)

    def fit_end(self, state: State, logger: Logger):
        self.path.write_text(json.dumps(self.steps))


def main(plan_file: str) -> int:
    from dip_scale.recipe import load_recipe
    from dip_scale.train.build import build_trainer
    from dip_scale.train.callbacks.preemption import Preempted

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in ("composer", "streaming", "torch.distributed"):  # as python -m dip_scale.train logs
        logging.getLogger(name).setLevel(logging.WARNING)
    plan = json.loads(Path(plan_file).read_text())
    root = Path(plan["root"])
    interface = os.environ.get("GLOO_SOCKET_IFNAME", "lo")
    first = True
    for name, overrides in plan["runs"].items():
        recipe = load_recipe(plan["recipe"], [*overrides, f"checkpoint.save_folder={root / name}",
                                              f"data.local={root / 'cache' / name / socket.gethostname()}"])
        if first:
            dist.initialize_dist("cpu", timeout=recipe.train.dist_timeout)
            first = False
        trainer, paths = build_trainer(recipe)
        if dist.get_local_rank() == 0:
            node = dist.get_global_rank() // dist.get_local_world_size()
            trainer.state.callbacks.append(InterfaceCounters(paths.local_root / f"net-node{node}.json", interface))
        try:
            trainer.fit()
        except Preempted:
            pass
        trainer.close()
        if dist.get_global_rank() == 0:
            print(f"train_many: {name} done at step {int(trainer.state.timestamp.batch)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
