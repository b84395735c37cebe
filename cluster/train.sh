#!/usr/bin/env bash
# Train DiP on 1..N nodes x G GPUs with Slurm. Preempted or out of time, the job checkpoints, requeues
# itself and resumes where it stopped.
#
#   sbatch cluster/train.sh recipes/dip_xl_256.yaml                                 # the #SBATCH sizes below
#   sbatch --nodes=4 cluster/train.sh recipes/dip_xl_256.yaml train.global_batch_size=1024
#   NODES=4 GPUS_PER_NODE=8 cluster/train.sh recipes/dip_xl_256.yaml                # submits itself
#
# Arguments: the recipe and `key=value` overrides, exactly as for `python -m dip_scale.train`. Run from
# the repository (relative recipe and data paths are relative to the submission folder).
#
# Environment (defaults in brackets):
#   NODES, GPUS_PER_NODE  only when this script submits itself: the allocation (--nodes, --gpus-per-node)
#                  [the #SBATCH lines]; inside the job GPUS_PER_NODE is the ranks per node
#                  [$SLURM_GPUS_ON_NODE, else 1]
#   RUN_NAME       overrides the recipe's run_name; a requeued job keeps it and resumes the same run
#   MASTER_PORT    rendezvous port on the first node [20000 + job id % 20000]
#   VENV           virtualenv to activate [<submission folder>/.venv if it exists, else the current PATH]
#   LOG_ROOT       per-job logs go to LOG_ROOT/<job name>-<job id>/restart-<n>/ [logs]
#   MAX_RESTARTS   requeues after which a preempted job stops instead [20]
#   SBATCH_*       sbatch's own variables (SBATCH_PARTITION, SBATCH_ACCOUNT, SBATCH_TIMELIMIT, ...)
#
# Exit status and requeue: 0 done; 2 bad recipe and 3 non-finite loss are final (never requeued); 75
# means the trainer checkpointed on a preemption warning, 76 that the ranks lost contact with each other (a
# node or its launcher died, or the network failed for longer than train.dist_timeout): the job requeues
# itself while fewer than MAX_RESTARTS restarts happened ($SLURM_RESTART_COUNT) and resumes from the last
# checkpoint. Any other status is a crash, not requeued. Each node's launcher writes its own status
# (launch_node.sh); a node whose ranks crashed outweighs nodes that only lost contact with it, so LOG_ROOT
# must be on a file system all nodes share (the default, under the submission folder). After Slurm's SIGTERM
# (scancel, time limit, a node it declared dead) Slurm decides: it requeues the job itself after a node
# failure (--requeue) and the log says so.
#
# ---- edit the allocation here (command-line flags of sbatch override these lines) -------------------
#SBATCH --job-name=dip-train
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --output=%x-%j.out
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
# Typical additions: --partition, --account, --time=24:00:00, --cpus-per-task (all CPUs of a node),
# --mem=0 (all memory of a node), --exclusive.
# -------------------------------------------------------------------------------------------------------
set -uo pipefail

if [ -z "${SLURM_JOB_ID:-}" ]; then
  # Not inside a job: submit this script with the sizes from the environment.
  exec sbatch ${NODES:+--nodes="$NODES"} ${GPUS_PER_NODE:+--gpus-per-node="$GPUS_PER_NODE"} "$0" "$@"
fi

if [ $# -lt 1 ]; then
  echo "usage: sbatch $0 RECIPE [key=value ...]" >&2
  exit 2
fi

log() { echo "[train.sh $(date '+%F %T')] $*"; }
restarts=${SLURM_RESTART_COUNT:-0}
MAX_RESTARTS=${MAX_RESTARTS:-20}

# ---- signals: Slurm's warning (USR1) reaches only this shell; pass it on once to every training process
stop_signal=""
step_pid=""
signals=0
on_signal() {
  local sig=$1
  signals=$((signals + 1))
  if [ -n "$stop_signal" ]; then
    log "received SIG$sig again; already stopping"
    return
  fi
  stop_signal=$sig
  if [ "$sig" = TERM ]; then
    # Slurm sends SIGTERM to every process of the job at once (time limit, preemption, scancel, node failure),
    # and SIGKILL KillWait seconds later: say now what Slurm did, this shell may not live to say it later.
    log "received SIGTERM: Slurm is ending the job; $(slurm_verdict)"
  elif [ -n "$step_pid" ]; then
    log "received SIG$sig: asking the trainer to checkpoint and stop"
    kill -USR1 "$step_pid" 2>/dev/null  # srun passes it to every process of the training step
  else
    log "received SIG$sig before training started"
  fi
}
# What Slurm has decided about this job, for the log: whether it requeued it itself (node failure, preemption
# with PreemptMode=REQUEUE; it then resumes from the last checkpoint) or not (cancelled, out of time).
slurm_verdict() {
  local job now slurm_restarts
  job=$(scontrol show job "$SLURM_JOB_ID" -o 2>/dev/null)
  now=$(grep -o 'JobState=[^ ]* Reason=[^ ]*' <<<"$job")
  slurm_restarts=$(sed -n 's/.* Restarts=\([0-9]*\).*/\1/p' <<<"$job")
  if [ "${slurm_restarts:-0}" -gt "$restarts" ]; then
    echo "Slurm has requeued the job itself (restart $slurm_restarts, $now): it resumes from the last checkpoint"
  else
    echo "not requeued ($now): Slurm requeues a job itself only after a node failure or a preemption with" \
         "PreemptMode=REQUEUE; cancelled or out of time, it stays ended"
  fi
}
trap 'on_signal USR1' USR1
trap 'on_signal TERM' TERM

requeue() {
  if [ "$restarts" -ge "$MAX_RESTARTS" ]; then
    log "not requeueing: already restarted $restarts times (MAX_RESTARTS=$MAX_RESTARTS); resubmit the same" \
        "command to continue from the last checkpoint"
    exit 75
  fi
  log "requeueing job $SLURM_JOB_ID (restart $((restarts + 1)) of at most $MAX_RESTARTS); it resumes from" \
      "the last checkpoint"
  if ! scontrol requeue "$SLURM_JOB_ID"; then
    log "error: scontrol requeue failed; resubmit the same command to continue from the last checkpoint"
  fi
  exit 75
}

# Slurm runs a copy of this script from its spool folder: find the original to reach launch_node.sh.
script=$(scontrol show job "$SLURM_JOB_ID" 2>/dev/null | sed -n 's/^ *Command=\([^ ]*\).*/\1/p' | head -n1)
here=$(cd "$(dirname "${script:-$SLURM_SUBMIT_DIR/cluster/train.sh}")" && pwd)
if [ ! -f "$here/launch_node.sh" ]; then
  log "error: cannot find launch_node.sh next to the job script ($here)"
  exit 1
fi

VENV=${VENV:-$SLURM_SUBMIT_DIR/.venv}
if [ -f "$VENV/bin/activate" ]; then
  # shellcheck disable=SC1091
  source "$VENV/bin/activate"
fi

NNODES=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}
if [ "$GPUS_PER_NODE" -lt 1 ]; then GPUS_PER_NODE=1; fi  # no GPU: one CPU rank per node
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
LOG_DIR=${LOG_ROOT:-logs}/${SLURM_JOB_NAME}-${SLURM_JOB_ID}/restart-${restarts}
mkdir -p "$LOG_DIR"
LOG_DIR=$(cd "$LOG_DIR" && pwd)
export NNODES GPUS_PER_NODE MASTER_ADDR MASTER_PORT LOG_DIR

recipe=$1
shift
overrides=("$@")
if [ -n "${RUN_NAME:-}" ]; then
  overrides+=("run_name=$RUN_NAME")
fi

log "job $SLURM_JOB_ID restart $restarts (max $MAX_RESTARTS): $NNODES node(s) x $GPUS_PER_NODE rank(s)," \
    "rendezvous $MASTER_ADDR:$MASTER_PORT, logs in $LOG_DIR"
if [ "$restarts" -gt "$MAX_RESTARTS" ]; then
  log "stopping: the job was restarted $restarts times, more than MAX_RESTARTS=$MAX_RESTARTS"
  exit 1
fi

# ---- check the recipe before starting any node: a bad recipe fails here, once, with the reason
resolved=$(WORLD_SIZE=$((NNODES * GPUS_PER_NODE)) python -m dip_scale.train "$recipe" "${overrides[@]}" --dry-run)
status=$?
if [ "$status" -ne 0 ]; then
  log "the recipe was rejected (exit $status, see the error above): not requeued"
  exit "$status"
fi
printf '%s\n' "$resolved" > "$LOG_DIR/config.yaml"
run_name=$(printf '%s\n' "$resolved" | sed -n 's/^run_name: *//p')
log "run $run_name: $(printf '%s\n' "$resolved" | tail -n1 | sed 's/^# //')"
if [ "$stop_signal" = USR1 ]; then  # warned while the recipe was checked: nothing started, come back later
  requeue
elif [ -n "$stop_signal" ]; then
  exit 143
fi

# ---- one task per node; each starts the composer launcher with its GPUS_PER_NODE ranks
# --wait: once one node's launcher has exited, the others get 60 s to follow (all do within seconds after
# a checkpoint or at the end) before Slurm ends them, so a node that died never leaves the rest hanging.
srun --nodes="$NNODES" --ntasks="$NNODES" --ntasks-per-node=1 --cpus-per-task="${SLURM_CPUS_ON_NODE:-1}" \
  --wait=60 bash "$here/launch_node.sh" "$recipe" "${overrides[@]}" &
step_pid=$!
if [ "$stop_signal" = USR1 ]; then  # the warning came while srun was being started
  kill -USR1 "$step_pid" 2>/dev/null
fi
while :; do
  before=$signals
  wait "$step_pid"
  status=$?
  # A trapped signal interrupts `wait` (status > 128) while the step runs on: wait again.
  if [ "$status" -gt 128 ] && [ "$signals" != "$before" ]; then
    continue
  fi
  break
done

# ---- what happened: each node's launcher wrote its status (launch_node.sh); a node without one lost its
# launcher (killed, or the node died). Read only after srun: the decision below must not race the nodes.
summary="" final="" crash="" lost="" preempted="" found=0
for ((node = 0; node < NNODES; node++)); do
  code=none
  if [ -f "$LOG_DIR/node$node.status" ]; then code=$(<"$LOG_DIR/node$node.status"); found=1; fi
  summary+="${summary:+, }node $node: $code"
  case $code in
    0) ;;
    2|3) final=${final:-$code} ;;
    75) preempted=1 ;;
    76|none) lost=1 ;;
    *) crash=${crash:-$code} ;;
  esac
done
if [ "$status" -ne 0 ] && [ "$found" = 1 ]; then
  log "node exit statuses: $summary (srun: $status)"
  if [ -n "$final" ]; then status=$final
  elif [ -n "$crash" ]; then status=$crash
  elif [ -n "$lost" ]; then status=76
  elif [ -n "$preempted" ]; then status=75
  fi
fi

if [ "$stop_signal" = TERM ]; then
  # Slurm ended the job (scancel, time limit, preemption without warning, a node it declared dead) and decides
  # itself whether it runs again: after a node failure or a preemption with PreemptMode=REQUEUE it requeues
  # the job (--requeue), which then resumes from the newest checkpoint; cancelled or out of time, it stays ended.
  log "training ended by Slurm's SIGTERM (exit $status); $(slurm_verdict)"
  exit "$status"
fi

case $status in
  0) log "training complete" ;;
  76)
    log "the ranks lost contact with each other (exit 76: a node or its launcher died, or the network failed" \
        "for longer than train.dist_timeout); the last checkpoint stands"
    requeue ;;
  75) log "training stopped for a requeue (exit 75)"; requeue ;;
  2) log "the recipe or its inputs were rejected (exit 2, see the error above): not requeued" ;;
  3) log "stopped on a non-finite loss (exit 3, last good state checkpointed): not requeued" ;;
  *)
    if [ "$stop_signal" = USR1 ]; then
      log "training exited with $status after SIGUSR1 (stopped before it could checkpoint); the last" \
          "checkpoint stands"
      requeue
    fi
    log "training failed with exit status $status (rank logs: $LOG_DIR): not requeued" ;;
esac
exit "$status"
