#!/usr/bin/env bash
# The sharded-population measurements a GPU box adds to benchmarks/scaling (issue 13, item 5).
#
#   OUT=$OUT bash scripts/gpu_scaling.sh            # on the GPU machine, from the repository root
#   QUICK=1 OUT=/tmp/gpu_scaling bash scripts/gpu_scaling.sh   # smoke run (tiny grid)
#
# 1. CPU strong scaling on its many cores: 1, 2 and 4 gloo processes, one thread each (the
#    2-core development machine can measure only 1 -> 2).
# 2. One GPU: the same MNIST grid with the population on one GPU (NCCL group of one), to set
#    against the CPU processes; with several GPUs, --procs 1,2,4 spreads it over them.
# Both write results.jsonl / results.md / scaling.png under $OUT and resume when rerun.
set -euo pipefail
OUT=${OUT:-runs/gpu_scaling}
QUICK_FLAG=${QUICK:+--quick}
export OMP_NUM_THREADS=1
.venv/bin/fvd bench scaling --testbeds toy,mnist --procs 1,2,4 --repeats 3 --device cpu $QUICK_FLAG --out "$OUT/cpu"
if command -v nvidia-smi > /dev/null && nvidia-smi -L > /dev/null 2>&1; then
  gpus=$(nvidia-smi -L | wc -l)
  procs=1
  if [ "$gpus" -ge 2 ]; then procs=1,2; fi
  if [ "$gpus" -ge 4 ]; then procs=1,2,4; fi
  .venv/bin/fvd bench scaling --testbeds mnist --procs "$procs" --repeats 3 --device cuda $QUICK_FLAG --out "$OUT/gpu"
else
  echo "no GPU visible: skipped the GPU part" >&2
fi
