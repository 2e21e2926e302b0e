#!/usr/bin/env bash
# Both SST-2 CPU grids of issue 12, side by side, one core each (run from the repository root,
# with gammaguide importable):
#
#   bash scripts/sst2_cpu_grids.sh [sst2:PATH]
#
# Pre-LN classifier: 5 arms (no_gamma, guidelines, all, only:residual_last, only:head) x 3 seeds.
# Post-LN classifier: 4 arms (no_gamma, all, only:stream, only:head) x 3 seeds, plus guidelines
# for seed 0 alone: for a post-LN model guidelines decays no γ, the same policy as no_gamma, so
# one run shows that the two are identical. Each grid logs to its results folder; a rerun of this
# script resumes both where they stopped.
set -u
data=${1:-sst2:../shared/data/sst2}
export OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1
pre=results/sst2-textcls_preln-cpu
post=results/sst2-textcls_postln-cpu
mkdir -p "$pre" "$post"
python -m gammaguide ablate --protocol sst2-cpu --model textcls_preln --data "$data" --out "$pre" \
  >> "$pre/log.txt" 2>&1 &
(
  python -m gammaguide ablate --protocol sst2-cpu --model textcls_postln --data "$data" \
    --arms no_gamma,all,only:stream,only:head --out "$post" &&
  python -m gammaguide ablate --protocol sst2-cpu --model textcls_postln --data "$data" \
    --arms guidelines --seeds 0 --out "$post"
) >> "$post/log.txt" 2>&1 &
wait
