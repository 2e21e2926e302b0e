#!/usr/bin/env bash
# The Multi30k translation grids, pre-LN and post-LN, on one lent GPU in one call (issue 12).
#
# Runs from the repository root of a copy of the working tree, with Multi30k carried in
# .data/multi30k-de-en (ignored by git). Before the call, on this machine:
#   mkdir -p .data/multi30k-de-en && cp -r ../shared/data/multi30k-de-en/raw .data/multi30k-de-en/
# then, with the device tool: run(command="bash scripts/gpu_text_ablation.sh $OUT 420 8",
#                                  carry=[".data"], timeout_s=560)
# The GPU machine has PyTorch, tokenizers and (by its package list) sacrebleu, but not this
# package: it runs from src/. Without sacrebleu the runs still finish: each record keeps its
# test-set translations, and scripts/rescore_bleu.py scores them here afterwards.
#
#   bash scripts/gpu_text_ablation.sh OUT_DIR [BUDGET_S] [JOBS_PER_MODEL] [more gammaguide ablate options]
#
# The two grids (seq2seq_preln: no_gamma, guidelines, all, only:head; seq2seq_postln: the same and
# only:stream; 3 seeds each; 27 runs) run side by side,
# each with JOBS_PER_MODEL runs at once and its epochs sized to BUDGET_S by a throughput probe
# taken while both grids probe. Everything lands in OUT_DIR/multi30k-<model>-gpu/ as it happens
# (results.jsonl: one line per finished run; log.txt), 4 files in all, so a call cut short still
# returns what finished. Then, here:
#   gammaguide report OUT/multi30k-seq2seq_postln-gpu/results.jsonl --out results/multi30k-seq2seq_postln-gpu
set -uo pipefail
out=${1:?usage: gpu_text_ablation.sh OUT_DIR [BUDGET_S] [JOBS_PER_MODEL]}
budget=${2:-420}
jobs=${3:-8}
shift $(( $# < 3 ? $# : 3 ))
export PYTHONPATH="$PWD/${GAMMAGUIDE_SRC:-src}${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export GAMMAGUIDE_CACHE=/tmp/gammaguide-cache
data=multi30k:.data/multi30k-de-en
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, tokenizers; print('torch', torch.__version__, 'tokenizers', tokenizers.__version__)"
  python3 -c "import sacrebleu; print('sacrebleu', sacrebleu.__version__)" || echo "no sacrebleu: rescore here"
} 2>&1 | tee "$out/env.txt"
# Tokenize once, before the two grids start, so that neither trains the tokenizer twice.
python3 -c "from gammaguide.experiments.text_data import load_text; load_text('$data', vocab_size=8000, max_len=128)" \
  || exit 1
pids=()
for model in seq2seq_preln seq2seq_postln; do
  dir="$out/multi30k-$model-gpu"
  mkdir -p "$dir"
  python3 -m gammaguide ablate --protocol multi30k-gpu --model "$model" --data "$data" --jobs "$jobs" \
    --epochs auto --time-budget "$budget" --checkpoint-dir "/tmp/gammaguide-ckpt-$model" --no-report \
    --out "$dir" "$@" > "$dir/log.txt" 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
date -u | tee -a "$out/env.txt"
tail -n 3 "$out"/multi30k-*-gpu/log.txt
exit "$status"
