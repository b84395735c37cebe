#!/usr/bin/env bash
# The one script a GPU session runs: what the machine is, then bench/gpu_bench.py (training step, sampling,
# memory; see its docstring), which first lists the versions of our stack (and what fails to import), and
# prints its table last.
#
# On the GPU machine (torch there, our other packages carried as wheels in .whl/, see
# ../shared/gpu/README.md), from the repository root:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 && bash bench/gpu_check.sh
# On a CPU (what CI checks): BENCH_ARGS="--cpu" bash bench/gpu_check.sh
#
# Environment (defaults in brackets):
#   OUT         folder for gpu_bench.json, gpu_bench.txt, gpu_bench.log and the profiles [runs/gpu_check]
#   BUDGET_S    gpu_bench skips sections that would end later than this [480]
#   TIMEOUT_S   hard limit for the benchmark process [BUDGET_S + 60]
#   PRESET      model preset [DiP-XL/16 on a GPU]
#   BENCH_ARGS  further gpu_bench.py flags, e.g. "--skip memory" or "--only train-eager,sample-eager"
#   PYTHON      interpreter [python3]
set -uo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-runs/gpu_check}
BUDGET_S=${BUDGET_S:-480}
TIMEOUT_S=${TIMEOUT_S:-$((${BUDGET_S%.*} + 60))}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
export OUT
# Compiled kernels are cached here, so a second run on the same machine compiles far less.
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/dip-inductor-cache}

echo "== machine"
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit --format=csv | tee "$OUT/gpu.csv"
else
  echo "no nvidia-smi: CPU only"
fi

echo "== gpu_bench (budget ${BUDGET_S} s)"
# shellcheck disable=SC2086  # BENCH_ARGS is a list of flags
timeout "$TIMEOUT_S" "$PYTHON" bench/gpu_bench.py --budget-s "$BUDGET_S" ${PRESET:+--preset "$PRESET"} ${BENCH_ARGS:-} \
  2>&1 | tee "$OUT/gpu_bench.log"
status=${PIPESTATUS[0]}
if [ "$status" -eq 124 ] && [ -f "$OUT/gpu_bench.json" ]; then
  echo "gpu_bench stopped after ${TIMEOUT_S} s; the sections finished so far:"
  "$PYTHON" bench/gpu_bench.py --table-from "$OUT/gpu_bench.json"
fi
exit "$status"
