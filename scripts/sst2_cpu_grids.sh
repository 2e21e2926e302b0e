#!/usr/bin/env bash
# Both SST-2 CPU grids of issue 12, side by side, one core each (run from the repository root,
# with gammaguide importable):
#
#   bash scripts/sst2_cpu_grids.sh [sst2:PATH]
#
# Each model has one arm that is another arm's policy under another name:
# Pre-LN classifier: no_gamma, guidelines, all, only:head x 3 seeds, then only:residual_last x 3
#   seeds (its γ are residual_last and head, so guidelines decays exactly the residual_last ones;
#   the claims table reads the γ_last claim from only:residual_last, so it gets every seed).
# Post-LN classifier: no_gamma, all, only:stream, only:head x 3 seeds, then guidelines x 3 seeds
#   (guidelines decays no γ of a post-LN model: the policy of no_gamma; the claims table compares
#   guidelines with all and no_gamma, so it gets every seed).
# Each grid logs to its results folder; a rerun of this script resumes both where they stopped.
set -u
data=${1:-sst2:../shared/data/sst2}
export OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1
pre=results/sst2-textcls_preln-cpu
post=results/sst2-textcls_postln-cpu
mkdir -p "$pre" "$post"
(
  python -m gammaguide ablate --protocol sst2-cpu --model textcls_preln --data "$data" \
    --arms no_gamma,guidelines,all,only:head --out "$pre" &&
  python -m gammaguide ablate --protocol sst2-cpu --model textcls_preln --data "$data" \
    --arms only:residual_last --seeds 0,1,2 --out "$pre"
) >> "$pre/log.txt" 2>&1 &
(
  python -m gammaguide ablate --protocol sst2-cpu --model textcls_postln --data "$data" \
    --arms no_gamma,all,only:stream,only:head --out "$post" &&
  python -m gammaguide ablate --protocol sst2-cpu --model textcls_postln --data "$data" \
    --arms guidelines --seeds 0,1,2 --out "$post"
) >> "$post/log.txt" 2>&1 &
wait
