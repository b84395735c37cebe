#!/usr/bin/env bash
# Start the training processes of ONE node: the composer launcher with GPUS_PER_NODE ranks, joined to the
# other nodes through MASTER_ADDR:MASTER_PORT. cluster/train.sh runs it once per node with srun; it also
# runs by hand, e.g. two nodes without Slurm:
#
#   node A: NNODES=2 NODE_RANK=0 GPUS_PER_NODE=8 MASTER_ADDR=nodeA cluster/launch_node.sh RECIPE [key=value ...]
#   node B: NNODES=2 NODE_RANK=1 GPUS_PER_NODE=8 MASTER_ADDR=nodeA cluster/launch_node.sh RECIPE [key=value ...]
#
# Environment (defaults in brackets):
#   NNODES         nodes in the job [$SLURM_NNODES, else 1]
#   NODE_RANK      this node's rank, 0..NNODES-1 [$SLURM_PROCID under srun, else 0]
#   GPUS_PER_NODE  ranks on this node, one per GPU [$SLURM_GPUS_ON_NODE, else 1]
#   MASTER_ADDR    host of node 0 [127.0.0.1]
#   MASTER_PORT    rendezvous port on node 0 [29500]
#   LOG_DIR        per-rank logs: rank<R>.out / rank<R>.err for every rank but each node's first, whose
#                  output goes to this script's own stdout/stderr [logs]
#   PYTHON         interpreter with dip_scale installed [python]
#
# Exit status: the training's (0 done, 2 bad recipe, 3 non-finite stop, 75 preempted after a checkpoint).
#
# Signals: Slurm delivers a signal sent to a job step to every process of the step. The ranks checkpoint
# on SIGUSR1/SIGTERM and exit 75 (before training starts, the signal ends them). The composer launcher
# would die of the signal's default action and leave the ranks without a parent, so it runs with handlers
# that only take note and waits for its ranks; told to stop before it started them, it exits 75 at once.
set -euo pipefail

NNODES=${NNODES:-${SLURM_NNODES:-1}}
# Under srun every task sees the same environment: its rank must come from Slurm, not from NODE_RANK.
NODE_RANK=${SLURM_PROCID:-${NODE_RANK:-0}}
GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
LOG_DIR=${LOG_DIR:-logs}
PYTHON=${PYTHON:-python}

if [ $# -lt 1 ]; then
  echo "usage: $0 RECIPE [key=value ...]   (environment: see the top of this file)" >&2
  exit 2
fi
mkdir -p "$LOG_DIR"

exec "$PYTHON" -c '
import signal, sys
warned = []
for sig in (signal.SIGUSR1, signal.SIGTERM):
    signal.signal(sig, lambda signum, _: warned.append(signum))  # unlike SIG_IGN, not inherited by the ranks
from composer.cli.launcher import main
if warned:  # told to stop before any rank started: nothing to save, try again later
    sys.exit(75)
sys.exit(main())
' \
  --nproc "$GPUS_PER_NODE" \
  --world_size "$((NNODES * GPUS_PER_NODE))" \
  --node_rank "$NODE_RANK" \
  --base_rank "$((NODE_RANK * GPUS_PER_NODE))" \
  --master_addr "$MASTER_ADDR" \
  --master_port "$MASTER_PORT" \
  --stdout "$LOG_DIR/rank{rank}.out" \
  --stderr "$LOG_DIR/rank{rank}.err" \
  -m dip_scale.train "$@"
