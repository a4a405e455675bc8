#!/usr/bin/env bash
# Fine-tuning and photos from scratch on a GPU machine (issue 22 points 4-5, issue 26 point 4), imgclf against
# fastai and timm's train.py, from the repository root:
#
#   bash benchmarks/gpu_finetune.sh KIT [OUT]
#
# KIT is a folder made on a machine that has ../shared/data, since the GPU machine reaches nothing and takes
# at most 64 MiB: KIT/pets/{train,test}/{cat,dog} (a subset of `pets`: the first 1,500 training pictures of
# each class by name, the whole test split), KIT/lite0.pth (../shared/data/pretrained's weights),
# KIT/timm_train.py (timm's train.py), KIT/whl/*.whl (fastai 2.8.12 and the packages it needs that the
# machine lacks: fastcore, fasttransform, fastdownload, plum-dispatch, beartype, and fastprogress 1.0.3,
# whose later releases import python-fasthtml). Each step prints what it ran and goes on when one fails.
set -u
KIT=$1 OUT=${2:-/tmp/imgclf-gpu-ft}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/peers-site "$KIT"/whl/*.whl
# the peers' Python: this machine's python3 with fastai added (imgclf's runs set their own PYTHONPATH)
printf '#!/bin/sh\nPYTHONPATH=/tmp/peers-site exec python3 "$@"\n' >/tmp/peers-python && chmod +x /tmp/peers-python
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
/tmp/peers-python -c "import torch, fastai, timm; print('torch', torch.__version__, 'fastai', fastai.__version__,
'timm', timm.__version__, torch.cuda.get_device_name(0))"
COMMON=(--sets pets --root "pets=$KIT/pets" --weights "$KIT/lite0.pth" --peers /tmp/peers-python
        --timm-train "$KIT/timm_train.py" --device cuda)
step() { echo; echo "== $*"; "$@" || echo "!! failed ($?): $*"; }
# fine-tuning, pets at 160 px, 3 epochs, two seeds
step python3 benchmarks/finetune.py "${COMMON[@]}" --seeds 0,1 --epochs pets=3 --tools imgclf,fastai,timm \
    --json "$OUT/finetune.json"
# from scratch, resnet18 at 128 px, 6 epochs, imgclf's defaults against fastai's
step python3 benchmarks/finetune.py "${COMMON[@]}" --scratch resnet18 --size pets=128 --epochs pets=6 --seeds 0 \
    --tools imgclf,fastai --json "$OUT/scratch.json"
# --batch-size auto: the largest batch that fits, then one epoch with it
step env PYTHONPATH="$PWD/src" python3 -m imgclf train --data "$KIT/pets" --model timm/tf_efficientnet_lite0 \
    --pretrained "$KIT/lite0.pth" --img-size 160 --epochs 1 --batch-size auto --device cuda --out /tmp/imgclf-auto
