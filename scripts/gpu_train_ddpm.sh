#!/usr/bin/env bash
# How the shipped MNIST DDPM was trained: the same recipe as `fvd train ddpm`, on one GPU, for a
# fixed wall-time budget, then exported (EMA weights) with its model card. Needs the MNIST data
# (`make data`) in $FVD_DATA_DIR (data/mnist here) and mlxtend importable (data/pylib).
set -o pipefail
export FVD_DATA_DIR=$PWD/data/mnist PYTHONPATH=$PWD/src:$PWD/data/pylib
OUTDIR=${OUT:-/tmp/gpuout}; mkdir -p $OUTDIR/weights
nvidia-smi -L 2>/dev/null
python3 -m fvdiffusion.cli train ddpm --device ${DEV:-cuda} --steps ${STEPS:-60000} --batch-size 256 --max-minutes ${MINUTES:-6} --checkpoint-every 5000 --out /tmp/ddpm_gpu 2>&1 | tr '\r' '\n' | grep -v "it/s" | tail -5
python3 -m fvdiffusion.cli train export --kind ddpm --run /tmp/ddpm_gpu --out $OUTDIR/weights 2>&1 | tail -3
cp /tmp/ddpm_gpu/train_log.jsonl /tmp/ddpm_gpu/checkpoint.json $OUTDIR/ 2>/dev/null
ls -la $OUTDIR $OUTDIR/weights
