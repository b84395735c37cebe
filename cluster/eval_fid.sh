#!/usr/bin/env bash
# FID (and sFID, IS, precision/recall) of one checkpoint with dip-eval, on its own allocation so that
# evaluation never holds up training. One node; with G GPUs, G ranks share the samples.
#
#   sbatch cluster/eval_fid.sh runs/dip-xl/checkpoints/step-000400000 --reference VIRTUAL_imagenet256_labeled.npz
#   sbatch --gpus-per-node=1 cluster/eval_fid.sh CHECKPOINT --reference /data/imagenet256/val -n 1000
#   GPUS_PER_NODE=4 cluster/eval_fid.sh CHECKPOINT --reference REF.npz          # submits itself
#
# Arguments: those of `dip-eval` (see `dip-eval --help`). The results JSON goes next to the checkpoint
# (or --out), and a row into <run>/eval/results.csv. Training jobs with eval.mode=slurm submit this
# script for each evaluation.
#
# Environment (defaults in brackets):
#   GPUS_PER_NODE  only when this script submits itself: GPUs to ask for [the #SBATCH line]; inside the
#                  job: ranks [$SLURM_GPUS_ON_NODE, else 1]
#   MASTER_PORT    port of the ranks' rendezvous on the node [20000 + job id % 20000]
#   VENV           virtualenv to activate [<submission folder>/.venv if it exists, else the current PATH]
#   LOG_ROOT       per-rank logs go to LOG_ROOT/<job name>-<job id>/ [logs]
#   DIP_INCEPTION_WEIGHTS  the Inception weights file when --inception-weights is not given
#   SBATCH_*       sbatch's own variables (SBATCH_PARTITION, SBATCH_ACCOUNT, SBATCH_TIMELIMIT, ...)
#
# ---- edit the allocation here (command-line flags of sbatch override these lines) ---------------------
#SBATCH --job-name=dip-eval
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --gpus-per-node=8
#SBATCH --output=%x-%j.out
# Typical additions: --partition, --account, --time=2:00:00, --cpus-per-task, --mem.
# -------------------------------------------------------------------------------------------------------
set -euo pipefail

if [ -z "${SLURM_JOB_ID:-}" ]; then
  exec sbatch ${GPUS_PER_NODE:+--gpus-per-node="$GPUS_PER_NODE"} "$0" "$@"
fi
if [ $# -lt 1 ]; then
  echo "usage: sbatch $0 CHECKPOINT --reference REF [dip-eval options]" >&2
  exit 2
fi

log() { echo "[eval_fid.sh $(date '+%F %T')] $*"; }

VENV=${VENV:-$SLURM_SUBMIT_DIR/.venv}
if [ -f "$VENV/bin/activate" ]; then
  # shellcheck disable=SC1091
  source "$VENV/bin/activate"
fi
GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}
if [ "$GPUS_PER_NODE" -lt 1 ]; then GPUS_PER_NODE=1; fi  # no GPU: one CPU rank
MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
LOG_DIR=${LOG_ROOT:-logs}/${SLURM_JOB_NAME}-${SLURM_JOB_ID}
mkdir -p "$LOG_DIR"

log "job $SLURM_JOB_ID on $(hostname): evaluating $1 with $GPUS_PER_NODE rank(s)"
if [ "$GPUS_PER_NODE" -eq 1 ]; then
  dip-eval --no-progress "$@"
else
  composer -n "$GPUS_PER_NODE" --master_port "$MASTER_PORT" \
    --stdout "$LOG_DIR/rank{rank}.out" --stderr "$LOG_DIR/rank{rank}.err" \
    -m dip_scale.eval.cli --no-progress "$@"
fi
log "done"
