"""This checkout's ``gammaguide.analyze`` against another version's, in one process, call by call.

    git worktree add /tmp/gg-base HEAD~1
    python bench/analyze_ab.py --baseline /tmp/gg-base/src/gammaguide

On a shared machine the speed of the CPU drifts by tens of percent from one minute to the next,
so timing two versions in two processes cannot resolve a change of a few percent. Here the
other version's package is copied under another name (``gammaguide_baseline``; the package
imports itself relatively) and both analyze the same model in alternating order; each pair of
calls sees the same machine. It prints the fastest and the median call of each, and the median
of the per-pair ratios (this checkout / baseline) with its interquartile range.
"""

from __future__ import annotations

import argparse
import importlib
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import gammaguide


def load_baseline(package_dir: Path):
    if not (package_dir / "__init__.py").is_file():
        raise SystemExit(f"--baseline {package_dir}: not a package folder (no __init__.py); pass the "
                         f"gammaguide folder of another checkout, e.g. /tmp/gg-base/src/gammaguide")
    root = Path(tempfile.mkdtemp(prefix="gg-baseline-"))
    shutil.copytree(package_dir, root / "gammaguide_baseline", ignore=shutil.ignore_patterns("__pycache__"))
    sys.path.insert(0, str(root))
    return importlib.import_module("gammaguide_baseline")


def paired(model, x, libs, pairs: int) -> tuple[list[float], list[float]]:
    for lib in libs:  # warm-up: imports, shape caches
        for _ in range(3):
            lib.analyze(model, x, warn=False)
    times = ([], [])
    for i in range(pairs):
        order = (0, 1) if i % 2 else (1, 0)
        for k in order:
            t = time.perf_counter()
            libs[k].analyze(model, x, warn=False)
            times[k].append(time.perf_counter() - t)
    return times


def main() -> int:
    import torchvision

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", type=Path, required=True, help="the gammaguide package folder to compare with")
    parser.add_argument("--models", default="mobilenet_v3_small,shufflenet_v2_x1_0",
                        help="comma-separated torchvision model names (1x3x224x224)")
    parser.add_argument("--pairs", type=int, default=151)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    base = load_baseline(args.baseline)
    print(f"this checkout: {Path(gammaguide.__file__).parent}; baseline: {args.baseline}; {args.pairs} pairs")
    for name in filter(None, args.models.split(",")):
        model = getattr(torchvision.models, name)().eval()  # as analyze_cost.py leaves it
        new, old = paired(model, torch.randn(1, 3, 224, 224), (gammaguide, base), args.pairs)
        ratios = sorted(n / o for n, o in zip(new, old, strict=True))
        q1, med, q3 = statistics.quantiles(ratios, n=4)
        print(f"{name:<22} this: fastest {min(new) * 1e3:.1f} ms, median {statistics.median(new) * 1e3:.1f}; "
              f"baseline: {min(old) * 1e3:.1f}, {statistics.median(old) * 1e3:.1f}; "
              f"this / baseline per pair: median {med:.3f} (quartiles {q1:.3f}-{q3:.3f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
