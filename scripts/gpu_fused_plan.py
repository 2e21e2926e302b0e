"""Size the grid part of scripts/gpu_fused.sh from its throughput probe (stdlib only).

    python scripts/gpu_fused_plan.py PROBE.jsonl RESULTS.jsonl --seconds S --runs 40 --epochs 30 \
        [--train 50000 --test 10000] [--fuse N] [--compile auto|0|1]

Reads the probe's JSON lines (bench/grid_throughput.py --json: the fused group's images/s per N,
eager and compiled, and the compile times) and the runs already finished, and prints one line
``FUSE COMPILE GROUPS`` (the group size for ``ablate --fuse``, 1 to compile or 0, and how many
whole groups fit in S seconds), then a sentence of why on stderr. A group that cannot finish in
the time left is worth nothing (its checkpoint is too large to carry to a later call), so the
choice is the (N, compiled) that finishes the most runs within S seconds, each group costing

    N * epochs * (train + test / 3) / rate(N) * 1.15 + compile time + 30 s start-up

(1.15 and test / 3 as ``ablate --epochs auto`` counts evaluation and measurements; rate(N) is
interpolated between the probed N; each group compiles anew).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path


def probe_rates(path: Path) -> dict[tuple[int, bool], tuple[float, float]]:
    """(N, compiled) -> (median images/s of the fused group, compile seconds)."""
    out: dict[tuple[int, bool], tuple[float, float]] = {}
    if not path.is_file():
        return out
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        rate = rec.get("median", {}).get("b")
        if rate:
            compile_s = max((e.get("compile_s") or 0.0 for e in rec.get("fused_extra", [])), default=0.0)
            out[(int(rec["n"]), bool(rec["compile"]))] = (float(rate), float(compile_s))
    return out


def finished(path: Path) -> int:
    if not path.is_file():
        return 0
    keys = set()
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("status") == "ok":
            keys.add(rec.get("key"))
    return len(keys)


def rate_for(rates: dict[tuple[int, bool], tuple[float, float]], g: int, compiled: bool) -> tuple[float, float, int]:
    """(images/s, compile s, nearest probed N) for a fused group of g runs: the eager rate
    interpolated linearly in N between the probed N (the nearest end beyond them); compiled,
    times the speed-up compiling gave at the nearest N probed both ways."""
    eager = sorted((n, r) for (n, c), (r, _) in rates.items() if not c)
    if not eager:
        raise SystemExit("the probe has no eager numbers")
    rate = eager[0][1] if g <= eager[0][0] else eager[-1][1]
    for (n0, r0), (n1, r1) in zip(eager, eager[1:], strict=False):
        if n0 <= g <= n1:
            rate = r0 + (r1 - r0) * (g - n0) / (n1 - n0)
    near = min((n for n, _ in eager), key=lambda n: abs(n - g))
    if not compiled:
        return rate, 0.0, near
    both = [n for n, c in rates if c and (n, False) in rates]
    if not both:
        raise SystemExit("the probe has no compiled number with an eager one at the same N")
    near = min(both, key=lambda n: abs(n - g))
    speedup = rates[(near, True)][0] / rates[(near, False)][0]
    return rate * speedup, rates[(near, True)][1], near


def first_group(runs: int, n: int) -> int:
    """The size of the largest group ``grid.make_groups`` cuts ``runs`` into (at most n)."""
    return math.ceil(runs / math.ceil(runs / n))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("probe", type=Path)
    p.add_argument("results", type=Path)
    p.add_argument("--seconds", type=float, required=True, help="time left for the grid")
    p.add_argument("--runs", type=int, default=40)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--train", type=int, default=50_000)
    p.add_argument("--test", type=int, default=10_000)
    p.add_argument("--fuse", type=int, help="use this group size")
    p.add_argument("--compile", default="auto", choices=("auto", "0", "1"))
    args = p.parse_args()

    left = args.runs - finished(args.results)
    rates = probe_rates(args.probe)
    if left <= 0:
        print("0 0 0")
        print("every run of the grid is finished", file=sys.stderr)
        return 0
    if not rates:
        print(f"{args.fuse or min(left, 16)} 0 1")
        print("no probe numbers: fusing 16 (or --fuse), eager", file=sys.stderr)
        return 0
    per_run = args.epochs * (args.train + args.test / 3) * 1.15
    best = None
    for compiled in sorted({c for _, c in rates}):
        if args.compile != "auto" and compiled != (args.compile == "1"):
            continue
        for n in [args.fuse] if args.fuse else range(1, left + 1):
            g = first_group(left, min(n, left))
            rate, compile_s, ref = rate_for(rates, g, compiled)
            group_s = g * per_run / rate + 30 + compile_s  # each new group compiles again
            fits = int(args.seconds // group_s)
            key = (min(left, fits * g), g)
            if best is None or key > best[0]:
                best = (key, n, compiled, fits, group_s, ref, rate)
    if best is None:
        print(f"{args.fuse or min(left, 16)} 0 0")
        print(f"no probe numbers for --compile {args.compile}", file=sys.stderr)
        return 0
    (done, _), n, compiled, fits, group_s, ref, rate = best
    print(f"{min(n, left)} {int(compiled)} {fits}")
    print(f"{left} runs left; groups of up to {n} ({'compiled' if compiled else 'eager'}, {rate:.0f} img/s from "
          f"the probe near N={ref}) take {group_s:.0f} s each: {fits} whole group(s), {done} runs, fit in "
          f"{args.seconds:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
