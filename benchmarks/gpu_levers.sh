#!/usr/bin/env bash
# The GPU race's levers behind `imgclf train --recipe fast` (issue 26), one by one and all together, against the
# airbench94 reference on this machine's GPU, from the repository root:
#
#   bash benchmarks/gpu_levers.sh CIFAR10_FOLDER_OR_TARBALL [SEEDS] [EPOCHS] [FEWER_EPOCHS] [BUDGET_S]
#
# Per seed (SEEDS rounds, default 3), each in a fresh process: the reference, then imgclf's baseline and the
# speed levers at EPOCHS (12: the fewest that reached the reference's accuracy in session 4), then the recipe
# details alone and every lever together at FEWER_EPOCHS (10: they are meant to reach it sooner). One line a
# run (training seconds, accuracy), then medians, ratios to the reference and whether its accuracy is reached.
# No new round starts when it would end after BUDGET_S seconds (default 255) of racing; the cache is warmed
# first (decoding outside every timing, ~30 s), so the whole stays under 5 minutes. A tarball is unpacked into /tmp. Needs python3 with torch and CUDA.
# DRY=1: imgclf on the CPU, no reference (a check of the machinery on a small folder; PYTHON picks python3).
set -euo pipefail
DATA=$1 SEEDS=${2:-3} EPOCHS=${3:-12} FEWER=${4:-10} BUDGET=${5:-255}
PY=${PYTHON:-python3}
if [[ -f $DATA ]]; then
    mkdir -p /tmp/imgclf-race && tar -xzf "$DATA" -C /tmp/imgclf-race
    DATA=$(dirname "$(find /tmp/imgclf-race -type d -name train | head -1)")
fi
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
BASE="--recipe records --batch-size 1024 --lr 1.5 --device cuda"
DRY_FLAG=() WARM=$BASE
if [[ ${DRY:-0} == 1 ]]; then
    BASE="--recipe records --batch-size 128 --lr 0.1875 --device cuda"  # gpu_race.py --dry runs it on the CPU
    DRY_FLAG=(--dry) WARM="--recipe records --batch-size 128 --device cpu"
else
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    "$PY" -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))"
fi
# the levers (src/imgclf/config.py declares each option; benchmarks/RESULTS.md, session 4, says why each)
BF16="--bf16-weights --precision bf16"    # (a) weights kept in bf16, no autocast, fused SGD over 16-bit tensors
DROP="--drop-last"                        # (b) no partial last batch: one cuDNN autotuning, not two
WARMUP=$("$PY" -c "print(round(0.23 * $FEWER, 2))")  # the reference warms up over 23% of its steps
RECIPE="--whiten-bias-epochs 3 --decay-biases --warmup-start 0.2 --lr-end 0.07 --warmup-epochs $WARMUP"  # (d)
# (c), the final max-pool without atomics, is fastnet's own since issue 26 (the same numbers): in every run
rm -rf /tmp/imgclf-levers-warm  # decode the JPEGs into imgclf's cache before the race (outside every timing)
# shellcheck disable=SC2086 # the flags are words
"$PY" -m imgclf train --data "$DATA" $WARM --epochs 1 --out /tmp/imgclf-levers-warm >/tmp/imgclf-levers-warm.log 2>&1 \
    || { tail -5 /tmp/imgclf-levers-warm.log; exit 1; }
"$PY" benchmarks/gpu_race.py --data "$DATA" --seeds "$SEEDS" --flags "$BASE" --budget "$BUDGET" "${DRY_FLAG[@]}" \
    --run "baseline:$EPOCHS:" --run "bf16-weights:$EPOCHS:$BF16" --run "drop-last:$EPOCHS:$DROP" \
    --run "recipe:$FEWER:$RECIPE" --run "all:$FEWER:$BF16 $DROP $RECIPE"
