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
#   GLOO_SOCKET_IFNAME, NCCL_SOCKET_IFNAME
#                  network interface the ranks talk on (gloo on CPU, NCCL's sockets on GPU) [with more than
#                  one node: the interface that reaches MASTER_ADDR from this node]. Without them gloo binds
#                  to whatever this node's hostname resolves to, often 127.0.x.1, and the nodes never connect.
#                  If no interface reaches MASTER_ADDR (no route, or only loopback), this script stops at once
#                  (exit 2) and names the variables to set.
#   MODULE         the Python module every rank runs with the arguments [dip_scale.train]
#
# Exit status: the node's, from its ranks' (0 done, 2 bad recipe, 3 non-finite stop, 75 preempted after a
# checkpoint, 76 lost contact with other ranks, 128+N killed by signal N), also written to
# LOG_DIR/node<NODE_RANK>.status for cluster/train.sh. When the node's ranks end differently, a rank's own
# failure (a crash, 2, 3) counts before 76 (that rank only saw another one go), and 76 before 75; ranks the
# launcher itself stopped after another rank ended do not count.
#
# Lifetime: the ranks die with the launcher (train/__main__.py sets PR_SET_PDEATHSIG), so a launcher that is
# killed takes its ranks along and the other nodes' ranks exit 76 within seconds.
#
# Signals: Slurm delivers a signal sent to a job step to every process of the step. The ranks checkpoint
# on SIGUSR1/SIGTERM and exit 75 (before training starts, the signal ends them). The composer launcher
# would die of the signal's default action (and, importing composer, installs a handler that exits on
# SIGTERM), taking its ranks with it before they could checkpoint, so it runs with handlers that only take
# note and waits for its ranks; told to stop before it started them, it exits 75 at once.
set -euo pipefail

NNODES=${NNODES:-${SLURM_NNODES:-1}}
# Under srun every task sees the same environment: its rank must come from Slurm, not from NODE_RANK.
NODE_RANK=${SLURM_PROCID:-${NODE_RANK:-0}}
GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
LOG_DIR=${LOG_DIR:-logs}
PYTHON=${PYTHON:-python}
MODULE=${MODULE:-dip_scale.train}

if [ $# -lt 1 ]; then
  echo "usage: $0 RECIPE [key=value ...]   (environment: see the top of this file)" >&2
  exit 2
fi
mkdir -p "$LOG_DIR"

# ---- the interface that reaches the first node, for gloo and NCCL (one node: loopback, nothing to choose)
interface_to() {  # prints the interface this node reaches address $1 on, or why not (status 1)
  local ip dev
  ip=$(getent ahosts "$1" | awk 'NR == 1 { print $1 }')
  if [ -z "$ip" ]; then echo "$1 does not resolve"; return 1; fi
  if ! command -v ip >/dev/null; then echo "the ip command (iproute2) is not installed"; return 1; fi
  # The first node itself: the interface that holds the address (its route would say loopback).
  dev=$(ip -o addr show to "$ip" | awk '{ print $2; exit }')
  if [ -z "$dev" ]; then
    dev=$(ip -o route get "$ip" 2>/dev/null | sed -n 's/.* dev \([^ ]*\).*/\1/p')
  fi
  if [ -z "$dev" ]; then echo "no route from this node to $ip"; return 1; fi
  if [ "$dev" = lo ]; then echo "$1 is $ip, a loopback address, which other nodes cannot reach"; return 1; fi
  echo "$dev"
}
if [ "$NNODES" -gt 1 ] && [ -z "${GLOO_SOCKET_IFNAME:-}" -o -z "${NCCL_SOCKET_IFNAME:-}" ]; then
  if ! iface=$(interface_to "$MASTER_ADDR"); then
    echo "launch_node.sh: error: cannot find the network interface that reaches MASTER_ADDR=$MASTER_ADDR" \
         "($iface). Set GLOO_SOCKET_IFNAME (CPU) and NCCL_SOCKET_IFNAME (GPU) to the interface of the network" \
         "the nodes share (e.g. eth0), or MASTER_ADDR to the first node's address on it." >&2
    exit 2
  fi
  export GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-$iface} NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-$iface}
  echo "launch_node.sh: node $NODE_RANK of $NNODES talks on GLOO_SOCKET_IFNAME=$GLOO_SOCKET_IFNAME" \
       "NCCL_SOCKET_IFNAME=$NCCL_SOCKET_IFNAME (MASTER_ADDR=$MASTER_ADDR)"
fi

NODE_STATUS=$LOG_DIR/node$NODE_RANK.status
rm -f "$NODE_STATUS"
export NODE_STATUS

exec "$PYTHON" -c '
import os, signal, sys
warned = []
def note(signum, frame):  # unlike SIG_IGN, not inherited by the ranks
    warned.append(signum)
for sig in (signal.SIGUSR1, signal.SIGTERM):
    signal.signal(sig, note)
from composer.cli import launcher
for sig in (signal.SIGUSR1, signal.SIGTERM):  # importing composer installed its own, which exits on SIGTERM
    signal.signal(sig, note)

def node_status(processes):
    codes = [1 if p.poll() is None else p.returncode for p in processes.values()]  # rank order
    if not any(codes):
        return 0
    own = [c for c in codes if c not in (0, 75, 76, -signal.SIGTERM)]  # -SIGTERM: stopped by the launcher
    for found in (own, [c for c in codes if c == 76], [c for c in codes if c == 75]):
        if found:
            return found[0]
    return next(c for c in codes if c)

launcher._aggregate_process_returncode = node_status  # what the launcher returns
code = 75 if warned else launcher.main()  # told to stop before any rank started: try again later
code = code if code >= 0 else 128 - code  # killed by signal N: 128 + N, as a shell reports it
with open(os.environ["NODE_STATUS"], "w") as f:
    f.write(f"{code}\n")
sys.exit(code)
' \
  --nproc "$GPUS_PER_NODE" \
  --world_size "$((NNODES * GPUS_PER_NODE))" \
  --node_rank "$NODE_RANK" \
  --base_rank "$((NODE_RANK * GPUS_PER_NODE))" \
  --master_addr "$MASTER_ADDR" \
  --master_port "$MASTER_PORT" \
  --stdout "$LOG_DIR/rank{rank}.out" \
  --stderr "$LOG_DIR/rank{rank}.err" \
  -m "$MODULE" "$@"
