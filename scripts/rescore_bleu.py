"""Score the translations kept in a results file with sacrebleu, on a machine that has it.

    python scripts/rescore_bleu.py RESULTS.jsonl --data multi30k:PATH [--out RESCORED.jsonl]

A translation run keeps its final test-set output in its record (``hypotheses``). Where the run
happened without sacrebleu (``test_bleu`` null), or to check a score, this recomputes corpus
BLEU against the test references of ``--data`` and writes every record again with
``test_bleu``, ``bleu_signature`` and the last history row's ``test_bleu`` filled in (to
``--out``, or over RESULTS.jsonl through a temporary file). Other records pass unchanged.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from gammaguide.experiments.bleu import corpus_bleu
from gammaguide.experiments.results import read_lines
from gammaguide.experiments.text_data import load_text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path)
    parser.add_argument("--data", required=True, help="multi30k:PATH, the data the runs translated")
    parser.add_argument("--out", type=Path, help="default: RESULTS.jsonl itself")
    args = parser.parse_args()
    refs_by_setting: dict[tuple, list[str]] = {}
    lines = []
    changed = 0
    for rec in read_lines(args.results):
        hyps = rec.get("hypotheses")
        if rec.get("metric") == "test_bleu" and rec.get("status") == "ok" and hyps:
            s = rec["settings"]
            key = (s["vocab_size"], s["max_len"], s.get("test_subset"), s.get("subset_seed", 0))
            if key not in refs_by_setting:
                data = load_text(args.data, vocab_size=s["vocab_size"], max_len=s["max_len"])
                refs_by_setting[key] = data.subset(None, s.get("test_subset"), s.get("subset_seed", 0)).test_refs
            score = corpus_bleu(hyps, refs_by_setting[key])
            old = rec.get("test_bleu")
            if old is not None and abs(old - score.score) > 1e-6:
                print(f"{rec['arm']} seed {rec['seed']}: recorded {old:.4f}, now {score.score:.4f}", file=sys.stderr)
            rec["test_bleu"], rec["bleu_signature"] = score.score, score.signature
            if rec.get("history"):
                rec["history"][-1]["test_bleu"] = score.score
            changed += 1
        lines.append(json.dumps(rec))
    out = args.out or args.results
    tmp = out.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text("".join(line + "\n" for line in lines))
    os.replace(tmp, out)
    print(f"{changed} translation records scored; wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
