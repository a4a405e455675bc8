#!/usr/bin/env bash
# imgclf against the airbench94 reference on this machine's GPU (issue 15), from the repository root:
#
#   bash benchmarks/gpu_race.sh CIFAR10_FOLDER_OR_TARBALL [SEEDS] ["EPOCHS ..."] [PROFILE]
#
# A tarball (../shared/data/cifar10-jpg.tar.gz) is unpacked into /tmp first. PROFILE=1 also prints where
# imgclf's training step goes (benchmarks/gpu_profile.py). Needs torch with CUDA; no network.
set -euo pipefail
DATA=$1 SEEDS=${2:-3} EPOCHS=${3:-10} PROFILE=${4:-0}
if [[ -f $DATA ]]; then
    mkdir -p /tmp/imgclf-race && tar -xzf "$DATA" -C /tmp/imgclf-race
    DATA=$(dirname "$(find /tmp/imgclf-race -type d -name train | head -1)")
fi
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))"
# decode the JPEGs into imgclf's cache before the race (outside both timings)
rm -rf /tmp/imgclf-race-warm
python3 -m imgclf train --data "$DATA" --recipe records --epochs 1 --batch-size 1024 --out /tmp/imgclf-race-warm >/dev/null
[[ $PROFILE == 1 ]] && python3 benchmarks/gpu_profile.py "$DATA"
EPOCH_FLAGS=(); for e in $EPOCHS; do EPOCH_FLAGS+=(--epochs "$e"); done
python3 benchmarks/gpu_race.py --data "$DATA" --seeds "$SEEDS" "${EPOCH_FLAGS[@]}"
