"""The paired check of issue 20: does the CPU fast path (bf16 autocast, channels_last, one thread per
run) change a comparison between arms beyond noise?

    python scripts/numerics_check.py FAST/results.jsonl results/cifar10-resnet20-cpu/results.jsonl \
        --arm only:residual_last --reference no_gamma

Both files hold the same arms and seeds of one protocol, trained once in float32 (the reference
numerics) and once on the fast path. For every seed it prints each arm's accuracy under both, the
paired difference arm - reference under both, and the difference of those differences, with the
95% t interval over seeds: the comparison is "not shown to change" when that interval contains 0.
It also prints how far single runs move between the two numerics (same arm, same seed): the noise
that numerics alone add to one run.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from gammaguide.experiments.results import read_lines
from gammaguide.experiments.stats import paired_difference


def _by_arm_seed(path: str, ignore: set[str]) -> dict[tuple[str, int], dict]:
    out = {}
    for r in read_lines(path):
        if r.get("status") == "ok":
            s = {k: v for k, v in r["settings"].items() if k not in ignore}
            out[(r["arm"], r["seed"])] = {"acc": r["test_acc"], "settings": s, "env": r.get("environment", {}),
                                          "data": r["settings"]["data"]}
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("fast")
    p.add_argument("reference_numerics")
    p.add_argument("--arm", default="only:residual_last")
    p.add_argument("--reference", default="no_gamma")
    args = p.parse_args()
    # The data may be named by another path to the same folder (the spec is compared by its last part).
    ignore = {"precision", "memory_format", "threads", "policy", "seed", "data"}
    fast, ref = _by_arm_seed(args.fast, ignore), _by_arm_seed(args.reference_numerics, ignore)
    seeds = sorted({s for (a, s) in fast if a == args.arm} & {s for (a, s) in fast if a == args.reference}
                   & {s for (a, s) in ref if a == args.arm} & {s for (a, s) in ref if a == args.reference})
    if not seeds:
        raise SystemExit("no seed has both arms in both files")
    first = (args.arm, seeds[0])
    same_data = Path(fast[first]["data"].partition(":")[2]).name == Path(ref[first]["data"].partition(":")[2]).name
    print(f"settings equal apart from numerics: {fast[first]['settings'] == ref[first]['settings'] and same_data} "
          f"(data {fast[first]['data']} and {ref[first]['data']})")
    keys = ("precision", "memory_format", "threads")
    print(f"fast numerics: {({k: fast[first]['env'].get(k) for k in keys})}")
    print(f"reference numerics: {({k: ref[first]['env'].get(k, '(unset: float32, contiguous)') for k in keys})}")
    print(f"\n| seed | {args.arm} float32 | {args.arm} fast | {args.reference} float32 | {args.reference} fast "
          f"| Δ float32 | Δ fast | Δ fast − Δ float32 |")
    print("|---|---|---|---|---|---|---|---|")
    d_ref, d_fast, moves = {}, {}, []
    for s in seeds:
        a32, af = 100 * ref[(args.arm, s)]["acc"], 100 * fast[(args.arm, s)]["acc"]
        r32, rf = 100 * ref[(args.reference, s)]["acc"], 100 * fast[(args.reference, s)]["acc"]
        d_ref[s], d_fast[s] = a32 - r32, af - rf
        moves += [af - a32, rf - r32]
        print(f"| {s} | {a32:.2f} | {af:.2f} | {r32:.2f} | {rf:.2f} | {d_ref[s]:+.2f} | {d_fast[s]:+.2f} | "
              f"{d_fast[s] - d_ref[s]:+.2f} |")
    dd = paired_difference(d_fast, d_ref)
    zero = {s: 0.0 for s in seeds}
    for name, d in (("float32", d_ref), ("fast", d_fast)):
        ci = paired_difference(d, zero)
        where = f" [{ci.low:+.2f}, {ci.high:+.2f}]" if ci.has_interval else ""
        print(f"\nΔ {name} ({args.arm} − {args.reference}): {ci.mean:+.2f}{where}, n={ci.n}", end="")
    print()
    if dd.has_interval:
        print(f"Δ fast − Δ float32: {dd.mean:+.2f} [{dd.low:+.2f}, {dd.high:+.2f}] points, n={dd.n} "
              f"({'changed: the interval excludes 0' if dd.excludes_zero else 'not shown to change'})")
    print(f"single runs, fast − float32 (same arm and seed): mean {statistics.fmean(moves):+.2f}, "
          f"sd {statistics.stdev(moves):.2f}, largest |move| {max(abs(m) for m in moves):.2f} points")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
