"""Paired differences between arms with 95% t intervals, from a results file alone.

    python scripts/paired_intervals.py RESULTS.jsonl [--vs no_gamma,all]

For every arm and reference arm: the per-seed differences of the primary metric (the key a
record's ``metric`` names, else ``test_acc``) over the seeds both have, their mean and the 95%
confidence interval of the mean (t distribution, n-1 degrees of freedom). A difference is
"shown" only when that interval excludes zero. Accuracy is printed in points (x100), BLEU as is.
"""

from __future__ import annotations

import argparse
import math
import statistics

from scipy import stats

from gammaguide.experiments.results import read_lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+")
    parser.add_argument("--vs", default="no_gamma,all", help="reference arms, comma-separated")
    args = parser.parse_args()
    values: dict[str, dict[int, float]] = {}
    scale = 100.0
    for r in read_lines(args.results):
        metric = r.get("metric", "test_acc")
        if r.get("status") == "ok" and isinstance(r.get(metric), (int, float)):
            values.setdefault(r["arm"], {})[r["seed"]] = r[metric]
            scale = 1.0 if metric == "test_bleu" else 100.0
    print("| arm | n | mean | " + " | ".join(f"paired Δ vs {v} [95% CI] | verdict" for v in args.vs.split(","))
          + " |")
    print("|---|---|---|" + "---|---|" * len(args.vs.split(",")))
    for arm, by_seed in values.items():
        cells = [arm, str(len(by_seed)), f"{scale * statistics.fmean(by_seed.values()):.2f}"]
        for ref in args.vs.split(","):
            seeds = sorted(set(by_seed) & set(values.get(ref, {})))
            if arm == ref or not seeds:
                cells += ["-", "-"]
                continue
            diffs = [scale * (by_seed[s] - values[ref][s]) for s in seeds]
            mean = statistics.fmean(diffs)
            if len(diffs) < 2:
                cells += [f"{mean:+.2f} (n=1)", "not shown"]
                continue
            half = stats.t.ppf(0.975, len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))
            shown = mean - half > 0 or mean + half < 0
            cells += [f"{mean:+.2f} [{mean - half:+.2f}, {mean + half:+.2f}]",
                      ("shown: higher" if mean > 0 else "shown: lower") if shown else "not shown"]
        print("| " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
