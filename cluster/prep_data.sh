#!/usr/bin/env bash
# Shard a dataset into MDS with dip-prep as a Slurm array job (each task writes its share of the chunks),
# then merge the parts with a job that starts only when every task succeeded, and verify the result.
#
#   TASKS=32 cluster/prep_data.sh imagenet /data/imagenet/train s3://bucket/imagenet256 --resolution 256
#   TASKS=4  cluster/prep_data.sh folder /data/flowers ./flowers64 --resolution 64 --encoding png
#   TASKS=2  cluster/prep_data.sh synthetic ./synthetic32 --num-images 10000 --resolution 32
#
# Arguments: those of `dip-prep write`, positional ones first: SOURCE [SRC] OUT [options]. Run it with
# bash from the repository (not with sbatch): it submits the two jobs and prints their ids. A failed or
# interrupted task is rerun with the same command: complete chunks are kept.
#
# Environment (defaults in brackets):
#   TASKS          array tasks [8]
#   CPUS_PER_TASK  CPUs of each task = dip-prep worker processes [8]
#   VERIFY         1: the merge job also runs `dip-prep verify` on the result; 0: skip [1]
#   VENV           virtualenv to activate [./.venv if it exists, else the current PATH]
#   SBATCH_*       sbatch's own variables (SBATCH_PARTITION, SBATCH_ACCOUNT, SBATCH_TIMELIMIT, ...)
# Logs: <job name>-<array job id>_<task>.out and <job name>-merge-<job id>.out in the current folder.
#
# ---- edit the allocation of each task here (command-line flags of sbatch override these lines) ---------
#SBATCH --job-name=dip-prep
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --output=%x-%A_%a.out
# Typical additions: --partition, --account, --time=4:00:00, --mem=32G.
# -------------------------------------------------------------------------------------------------------
set -euo pipefail

log() { echo "[prep_data.sh $(date '+%F %T')] $*"; }

activate() {
  local venv=${VENV:-${SLURM_SUBMIT_DIR:-$PWD}/.venv}
  if [ -f "$venv/bin/activate" ]; then
    # shellcheck disable=SC1091
    source "$venv/bin/activate"
  fi
}

case ${DIP_PREP_STEP:-submit} in
  submit)
    if [ $# -lt 2 ]; then
      echo "usage: TASKS=N $0 SOURCE [SRC] OUT [dip-prep write options]" >&2
      exit 2
    fi
    case $1 in
      synthetic) out=$2 ;;
      imagenet|folder) out=${3:?"usage: $0 $1 SRC OUT [options]"} ;;
      *) echo "$0: unknown source '$1' (imagenet, folder or synthetic)" >&2; exit 2 ;;
    esac
    TASKS=${TASKS:-8}
    CPUS_PER_TASK=${CPUS_PER_TASK:-8}
    script=$(cd "$(dirname "$0")" && pwd)/$(basename "$0")
    array=$(DIP_PREP_STEP=write sbatch --parsable --array="0-$((TASKS - 1))" --cpus-per-task="$CPUS_PER_TASK" \
      "$script" "$@")
    array=${array%%;*}
    merge=$(DIP_PREP_STEP=merge sbatch --parsable --dependency="afterok:$array" --kill-on-invalid-dep=yes \
      --job-name=dip-prep-merge --output=%x-%j.out --cpus-per-task="$CPUS_PER_TASK" "$script" "$out")
    merge=${merge%%;*}
    log "submitted array job $array ($TASKS tasks) writing $out, and merge job $merge (starts when all succeeded)"
    log "watch: squeue -j $array,$merge; logs: dip-prep-${array}_<task>.out, dip-prep-merge-$merge.out"
    ;;
  write)
    activate
    log "task $SLURM_ARRAY_TASK_ID of array job $SLURM_ARRAY_JOB_ID ($SLURM_ARRAY_TASK_COUNT tasks) on $(hostname)"
    # dip-prep reads its share from SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT.
    source=$1
    shift
    dip-prep write "$source" --workers "${SLURM_CPUS_PER_TASK:-1}" --no-progress "$@"
    ;;
  merge)
    activate
    out=$1
    log "merging the parts of $out"
    dip-prep merge "$out"
    if [ "${VERIFY:-1}" = 1 ]; then
      log "verifying $out"
      dip-prep verify "$out" --workers "${SLURM_CPUS_PER_TASK:-1}" --no-progress
    fi
    log "done: $out"
    ;;
  *)
    echo "$0: DIP_PREP_STEP must be write or merge, got '$DIP_PREP_STEP'" >&2
    exit 2
    ;;
esac
