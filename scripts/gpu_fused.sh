#!/usr/bin/env bash
# Issues 10 and 11 on one lent GPU in one call: the throughput of fused grids, then the converged
# ResNet-56 grid (8 arms x 5 seeds, 30 epochs, cosine, weight decay 5e-4, batch 128, all of CIFAR-10)
# trained in fused groups, as much of it as whole groups fit in the call.
#
# DATA. The machine gets the working tree (64 MiB at most) and nothing else. The decoded uint8
# CIFAR-10 cache (experiments/data.py: one torch.save of 60,000 x 3 x 32 x 32 uint8 = 184 MB) does not
# fit, nor does the JPEG tree as 60,000 files (55 MB of JPEG, ~236 MB on disk). Gzipped as one tar it is
# 19.8 MB: each 32x32 JPEG is ~900 bytes, two thirds of them the same header tables, which gzip
# removes across files. So, here, before the call (.data/ is ignored by git):
#   mkdir -p .data && tar czf .data/cifar10-jpeg.tar.gz -C ../shared/data --exclude=README.md cifar10-jpeg
# and there the script unpacks it to /tmp and decodes it once into the cache (same pixels as here).
#
# THE CALL (the package is not installed there: it runs from src/; no scipy there):
#   run(command="bash scripts/gpu_fused.sh", carry=[".data/cifar10-jpeg.tar.gz", "runs/gpu-fused"],
#       timeout_s=600)
# What comes back, under $OUT: log.txt, probe.jsonl (bench/grid_throughput.py --json, one line per
# N and mode), plan.txt, results.jsonl (every run finished so far: the carried ones, then this call's).
#
# RESUMING. A group's checkpoint (hundreds of MB for 40 ResNet-56 runs) cannot come back, so a call
# only gains the groups it finishes; gpu_fused_plan.py sizes the groups from the probe so that whole
# groups fit in the time left. For the next call, copy the returned results.jsonl and probe.jsonl
# into runs/gpu-fused/ (ignored by git, carried) and call again with PROBE=none: it skips the probe,
# reuses those numbers and trains the runs not in results.jsonl.
#
# Knobs (environment): BUDGET_S (560: the script's whole wall time; the call's limit is 600),
# PROBE (full: N = 1, 16, 32, 40 eager, then compiled from 40 down while PROBE_S lasts; quick: N = 16
# and 40 eager, 40 compiled; none), PROBE_S (240), EPOCHS (30), SEEDS (0,1,2,3,4), FUSE and COMPILE
# (0/1; default: chosen by the plan), MODEL (resnet56), DEVICE (cuda), EXTRA (more `ablate` options),
# BENCH (more bench options), DATA_TAR, N_TRAIN/N_TEST (50000/10000, for the plan), CARRIED
# (runs/gpu-fused), UNPACK (/tmp), CKPT (/tmp/gammaguide-ckpt), GAMMAGUIDE_CACHE.
# Dry run on a CPU (what was run before committing it):
#   OUT=/tmp/dry DEVICE=cpu MODEL=resnet20 EPOCHS=1 SEEDS=0 PROBE=quick PROBE_NS="2" BUDGET_S=900 \
#   BENCH="--images 256 --batch-size 16 --chunk 2 --seconds 3" EXTRA="--subset 160 --test-subset 100 \
#   --batch-size 16" N_TRAIN=160 N_TEST=100 DATA_TAR=/tmp/tiny.tar.gz UNPACK=/tmp/dry CKPT=/tmp/dry/ckpt \
#   GAMMAGUIDE_CACHE=/tmp/dry/cache bash scripts/gpu_fused.sh
set -uo pipefail
t0=$(date +%s)
OUT=${OUT:-runs/gpu-fused-out}
BUDGET_S=${BUDGET_S:-560}
PROBE=${PROBE:-full}
PROBE_S=${PROBE_S:-240}
EPOCHS=${EPOCHS:-30}
SEEDS=${SEEDS:-0,1,2,3,4}
MODEL=${MODEL:-resnet56}
DEVICE=${DEVICE:-cuda}
DATA_TAR=${DATA_TAR:-.data/cifar10-jpeg.tar.gz}
CARRIED=${CARRIED:-runs/gpu-fused}
UNPACK=${UNPACK:-/tmp}
CKPT=${CKPT:-/tmp/gammaguide-ckpt}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export GAMMAGUIDE_CACHE=${GAMMAGUIDE_CACHE:-/tmp/gammaguide-cache}
log="$OUT/log.txt"
left() { echo $(( BUDGET_S - ($(date +%s) - t0) )); }
say() { echo "[$(( $(date +%s) - t0 )) s] $*" | tee -a "$log"; }

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"
} 2>&1 | tee -a "$log"

# ---- data: unpack the carried tar, decode once into the cache
top=$(tar tzf "$DATA_TAR" 2>/dev/null | head -1 | cut -d/ -f1)
[ -n "$top" ] || { say "cannot read $DATA_TAR (see the header for how to make it)"; exit 2; }
data="$UNPACK/$top"
mkdir -p "$UNPACK"
[ -d "$data/train" ] || tar xzf "$DATA_TAR" -C "$UNPACK" || { say "cannot unpack $DATA_TAR"; exit 2; }
python3 -c "from gammaguide.experiments.data import load_dataset as l; d = l('imagefolder:$data', progress=False); \
print('data', d.train_x.shape, d.test_x.shape)" 2>&1 | tee -a "$log"
say "data ready"

# ---- probe: one fused group of N runs, eager and compiled (bench/grid_throughput.py, part b)
probe="$OUT/probe.jsonl"
[ -f "$CARRIED/probe.jsonl" ] && [ "$PROBE" = none ] && cp "$CARRIED/probe.jsonl" "$probe"
bench() {  # bench N [--compile]: one line into probe.jsonl, if the probe's time allows
  local spent=$(( $(date +%s) - t0 )) need=40
  [ "${2:-}" = --compile ] && need=150
  if [ $(( PROBE_S - spent )) -lt $need ]; then say "probe: no time left for N=$1 $*"; return; fi
  timeout -k 5 $(( PROBE_S - spent )) python3 bench/grid_throughput.py --device "$DEVICE" --model "$MODEL" --n "$@" \
    --parts b --repeats 1 --seconds 6 --json "$probe" ${BENCH:-} 2>&1 | tee -a "$log"
}
case "$PROBE" in
  full)
    for n in ${PROBE_NS:-1 16 32 40}; do bench "$n"; done
    for n in $(echo ${PROBE_NS:-1 16 32 40} | tr ' ' '\n' | sort -rn); do bench "$n" --compile; done ;;
  quick)
    for n in ${PROBE_NS:-16 40}; do bench "$n"; done
    bench "$(echo ${PROBE_NS:-16 40} | tr ' ' '\n' | sort -rn | head -1)" --compile ;;
esac
say "probe done"

# ---- the grid: as many whole fused groups as fit in the time left
[ -f "$CARRIED/results.jsonl" ] && [ ! -f "$OUT/results.jsonl" ] && cp "$CARRIED/results.jsonl" "$OUT/results.jsonl"
runs=$(( 8 * $(echo "$SEEDS" | tr ',' '\n' | grep -c .) ))
plan=$(python3 scripts/gpu_fused_plan.py "$probe" "$OUT/results.jsonl" --seconds "$(( $(left) - 15 ))" --runs "$runs" \
       --epochs "$EPOCHS" --train "${N_TRAIN:-50000}" --test "${N_TEST:-10000}" ${FUSE:+--fuse "$FUSE"} \
       --compile "${COMPILE:-auto}" 2>>"$log")
echo "$plan" > "$OUT/plan.txt"
read -r fuse compile groups <<< "$plan"
say "plan: fuse $fuse, compile $compile, $groups whole group(s) fit"
status=0
if [ "${groups:-0}" -gt 0 ]; then
  timeout -k 10 "$(( $(left) - 5 ))" python3 -m gammaguide ablate --protocol gpu --model "$MODEL" --device "$DEVICE" \
    --data "imagefolder:$data" --seeds "$SEEDS" --epochs "$EPOCHS" --fuse "$fuse" $( [ "$compile" = 1 ] && echo --compile ) \
    --checkpoint-dir "$CKPT" --out "$OUT" --no-report ${EXTRA:-} 2>&1 | tee -a "$log"
  status=${PIPESTATUS[0]}
else
  say "no whole group fits in the time left: nothing trained (see plan.txt and the log)"
fi
say "grid exit status $status; $(grep -c . "$OUT/results.jsonl" 2>/dev/null || echo 0) runs in results.jsonl"
date -u | tee -a "$log"
exit 0
