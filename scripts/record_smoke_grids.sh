#!/usr/bin/env bash
# Record the smoke grids of every harness path into OUT, with the code under SRC (issue 22's
# identical-records check). Run it once from a frozen copy of the old code and once from the new,
# then compare with scripts/compare_records.py OLD_OUT NEW_OUT.
#
#   git worktree add /tmp/base HEAD
#   scripts/record_smoke_grids.sh /tmp/base/src /tmp/records-before
#   scripts/record_smoke_grids.sh src /tmp/records-after
#   python scripts/compare_records.py /tmp/records-before /tmp/records-after
#
# Paths: image smoke (8 arms), image --fuse 4, sst2-smoke, multi30k-smoke, image --jobs 2, a small
# cifar100-d2 grid (bf16, channels_last, one-cycle, per-epoch test subset), image
# and text `train`, and runs killed (kill -9) after their first epoch's checkpoint and resumed
# (a lone image run, a fused group, an sst2 run). Everything on the CPU with one thread a run,
# so that floats are bit-identical between the two copies. DATA defaults to /work/shared/data.
set -euo pipefail
SRC=$(cd "$1" && pwd); OUT=$2; DATA=${DATA:-/work/shared/data}
mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
export PYTHONPATH=$SRC OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONHASHSEED=0
PY=${PYTHON:-python}
IMG=imagefolder:$DATA/cifar10-jpeg
gg() { nice -n 19 "$PY" -W ignore -m gammaguide "$@"; }
step() { echo "== $1 ($(date +%T))"; }
[ "$($PY -c 'import gammaguide, os; print(os.path.dirname(os.path.dirname(gammaguide.__file__)))')" = "$SRC" ] \
  || { echo "gammaguide is not imported from $SRC" >&2; exit 2; }

# A command killed (kill -9) as soon as its first checkpoint file appears, then run again to the end.
kill_and_resume() {
  local name=$1; shift
  local dir=$OUT/$name
  rm -rf "$dir"; mkdir -p "$dir"
  nice -n 19 "$PY" -W ignore -m gammaguide "$@" --out "$dir" > "$dir/first.log" 2>&1 &
  local pid=$!
  while kill -0 "$pid" 2>/dev/null; do
    if compgen -G "$dir/checkpoints/*.pt" > /dev/null; then kill -9 "$pid"; break; fi
    sleep 0.1
  done
  wait "$pid" 2>/dev/null || true
  ls "$dir/checkpoints" > "$dir/killed-with.txt" 2>/dev/null || echo "finished before the kill" > "$dir/killed-with.txt"
  gg "$@" --out "$dir" > "$dir/resume.log" 2>&1
}

step image-smoke
gg ablate --protocol smoke --data "$IMG" --device cpu --no-report --out "$OUT/image-smoke" > "$OUT/image-smoke.log" 2>&1
step image-fuse4
gg ablate --protocol smoke --data "$IMG" --device cpu --fuse 4 --no-report --out "$OUT/image-fuse4" > "$OUT/image-fuse4.log" 2>&1
step sst2-smoke
gg ablate --protocol sst2-smoke --data sst2:$DATA/sst2 --device cpu --no-report --out "$OUT/sst2-smoke" > "$OUT/sst2-smoke.log" 2>&1
step multi30k-smoke
gg ablate --protocol multi30k-smoke --data multi30k:$DATA/multi30k-de-en --device cpu --no-report --out "$OUT/multi30k-smoke" > "$OUT/multi30k-smoke.log" 2>&1
step image-jobs2
gg ablate --protocol smoke --data "$IMG" --device cpu --arms guidelines,no_gamma,all,only:shortcut --seeds 1 --jobs 2 --no-report --out "$OUT/image-jobs2" > "$OUT/image-jobs2.log" 2>&1
step cifar100-d2
gg ablate --protocol cifar100-d2 --data cifar100:$DATA/cifar100 --device cpu --arms no_gamma,guidelines --seeds 0 --epochs 2 --subset 500 --test-subset 2500 --batch-size 64 --no-report --out "$OUT/cifar100-d2" > "$OUT/cifar100-d2.log" 2>&1
step image-train
gg train --data "$IMG" --device cpu --policy only:stream --seed 2 --epochs 1 --subset 320 --test-subset 200 --batch-size 64 --no-progress --out "$OUT/image-train" > "$OUT/image-train.log" 2>&1
step text-train
gg train --data sst2:$DATA/sst2 --device cpu --policy all --seed 3 --epochs 1 --subset 320 --test-subset 100 --batch-size 32 --width 32 --layers 1 --heads 2 --vocab-size 300 --max-len 32 --no-progress --out "$OUT/text-train" > "$OUT/text-train.log" 2>&1
step image-resume
kill_and_resume image-resume ablate --protocol smoke --data "$IMG" --device cpu --arms only:residual_last --epochs 2 --no-report
step fused-resume
kill_and_resume fused-resume ablate --protocol smoke --data "$IMG" --device cpu --arms guidelines,only:shortcut,all --seeds 0,1 --fuse 3 --epochs 2 --no-report
step sst2-resume
kill_and_resume sst2-resume ablate --protocol sst2-smoke --data sst2:$DATA/sst2 --device cpu --arms guidelines,all --epochs 2 --no-report
step done
