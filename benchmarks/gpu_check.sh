#!/usr/bin/env bash
# The GPU paths of imgclf, in one short script for a machine with one CUDA GPU (issue 4): the device, bf16
# and fp16 training, NCCL through torchrun, eval and predict on the GPU, time to 94% on the CIFAR-10 folders.
#
#   bash benchmarks/gpu_check.sh CIFAR10_FOLDER OUT_FOLDER      (from the repository root; torch installed)
#
# Each step prints what it ran; a failing step is reported and the script goes on to the next.
set -u
DATA=$1
OUT=${2:-/tmp/imgclf-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
FAST="--recipe records --batch-size 1024 --lr 1.5"  # the speed records' batch; the lr scales with it

step() { echo; echo "== $*"; "$@" || echo "!! failed ($?): $*"; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__,
torch.cuda.get_device_name(0), 'bf16', torch.cuda.is_bf16_supported())"

# time to accuracy (the first run also decodes the JPEGs into the cache)
step python3 benchmarks/time_to_accuracy.py --data "$DATA" --flags "$FAST" --epochs 10 --epochs 12 --epochs 14 \
    --target 0.94 --budget 60
# a kept run, for eval and predict; then the other precisions, torch.compile and NCCL
step python3 -m imgclf train --data "$DATA" $FAST --epochs 12 --out "$OUT/fast12"
step python3 -m imgclf eval "$OUT/fast12/checkpoints/last.pt" --data "$DATA"
step python3 -m imgclf predict "$OUT/fast12/checkpoints/last.pt" "$DATA/test/cat/0000.jpg" "$DATA/test/ship"
step python3 -m imgclf train --data "$DATA" $FAST --precision fp16 --epochs 12 --out "$OUT/fp16"
step python3 -m imgclf train --data "$DATA" --epochs 2 --out "$OUT/tutorial"
step torchrun --standalone --nproc-per-node 1 -m imgclf train --data "$DATA" $FAST --epochs 2 --out "$OUT/nccl"
step timeout 150 python3 -m imgclf train --data "$DATA" $FAST --compile --epochs 12 --out "$OUT/compiled"
for run in fast12 fp16 tutorial nccl compiled; do
    [ -f "$OUT/$run/metrics.jsonl" ] && python3 - "$OUT/$run/metrics.jsonl" <<'PY'
import json, sys
records = [json.loads(line) for line in open(sys.argv[1])]
seconds = [r.get("train_seconds", 0.0) for r in records]
print(f"{sys.argv[1]}: {len(records)} epochs, final test accuracy {records[-1]['val_acc']:.2%}, "
      f"{sum(seconds):.2f}s of training (per epoch: {', '.join(f'{s:.2f}' for s in seconds)})")
PY
done
