#!/usr/bin/env bash
# The paper-scale ablation on one lent GPU, in one call (issue 5).
#
# Runs from the repository root of a copy of the working tree, with the CIFAR-10 JPEG tree
# carried in .data/cifar10-jpeg (copy it there first: cp -r ../shared/data/cifar10-jpeg .data/).
# The GPU machine has PyTorch, torchvision and matplotlib but not this package: it runs from src/.
#
#   bash scripts/gpu_ablation.sh OUT_DIR [BUDGET_S] [JOBS] [MODEL] [more gammaguide ablate options]
#
# Since `ablate --fuse auto` became the default, runs fuse into groups on CUDA (see docs/fused.md);
# pass --fuse 1 as a further option for separate processes, as the results of issue 5 were trained.
#
# Everything lands in OUT_DIR as it happens: results.jsonl gets one line per finished run, the
# log every epoch of every run, so a call cut short still returns what it finished.
set -uo pipefail
out=${1:?usage: gpu_ablation.sh OUT_DIR [BUDGET_S] [JOBS] [MODEL]}
budget=${2:-470}
jobs=${3:-16}
model=${4:-resnet56}
shift $(( $# < 4 ? $# : 4 ))
mkdir -p "$out"
export PYTHONPATH="$PWD/${GAMMAGUIDE_SRC:-src}${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export GAMMAGUIDE_CACHE=/tmp/gammaguide-cache
log="$out/log.txt"
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"
} 2>&1 | tee -a "$log"
python3 -m gammaguide ablate --protocol gpu --model "$model" --data imagefolder:.data/cifar10-jpeg \
  --jobs "$jobs" --epochs auto --time-budget "$budget" --checkpoint-dir /tmp/gammaguide-ckpt \
  --out "$out" "$@" 2>&1 | tee -a "$log"
status=${PIPESTATUS[0]}
date -u | tee -a "$log"
exit "$status"
