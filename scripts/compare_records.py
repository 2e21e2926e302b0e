"""Compare two recordings of the smoke grids (scripts/record_smoke_grids.sh): every results record
must be identical, times aside (issue 22).

    python scripts/compare_records.py BEFORE_DIR AFTER_DIR

For every results file under BEFORE_DIR (one per path: image smoke, --fuse 4, sst2, ...) the file at
the same place under AFTER_DIR must hold the same runs (matched by key), and each run's record must
be equal field by field, every metric, history value and mechanism (floats bit for bit: the JSON
numbers are compared as parsed), except the fields that measure time: ``wall_s``, the throughputs
(``train_images_per_s``, ``train_tokens_per_s``, in the record and in each history row) and the
host in ``environment``. It also says whether the fields come in the same order. Exit status 1
when any path differs or is missing.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

TIMES = {"wall_s", "train_images_per_s", "train_tokens_per_s"}
ENVIRONMENT_TIMES = {"host"}


def without_times(record: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in record.items() if k not in TIMES}
    out["environment"] = {k: v for k, v in record.get("environment", {}).items() if k not in ENVIRONMENT_TIMES}
    out["history"] = [{k: v for k, v in row.items() if k not in TIMES} for row in record.get("history", [])]
    return out


def differences(a: Any, b: Any, where: str = "") -> list[str]:
    """Where two parsed JSON values differ (the first few)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = [f"{where}.{k}: only in {'before' if k in a else 'after'}" for k in sorted(set(a) ^ set(b))]
        for k in a:
            if k in b:
                out += differences(a[k], b[k], f"{where}.{k}")
        return out
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{where}: {len(a)} items before, {len(b)} after"]
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in differences(x, y, f"{where}[{i}]")]
    return [] if a == b and type(a) is type(b) else [f"{where}: {a!r} before, {b!r} after"]


def order(record: dict[str, Any]) -> list[Any]:
    return [list(record), [list(row) for row in record.get("history", [])]]


def compare(before: Path, after: Path) -> bool:
    same = True
    files = sorted(before.rglob("results.jsonl"))
    if not files:
        print(f"no results.jsonl under {before}")
        return False
    for path in files:
        name = str(path.parent.relative_to(before))
        other = after / path.relative_to(before)
        if not other.is_file():
            print(f"{name}: MISSING in {after}")
            same = False
            continue
        a = {r["key"]: r for r in map(json.loads, path.read_text().splitlines())}
        b = {r["key"]: r for r in map(json.loads, other.read_text().splitlines())}
        problems = [f"run {k}: only {'before' if k in a else 'after'}" for k in sorted(set(a) ^ set(b))]
        values = 0
        for k in sorted(set(a) & set(b)):
            found = differences(without_times(a[k]), without_times(b[k]))
            problems += [f"run {a[k]['arm']} seed {a[k]['seed']}{d}" for d in found]
            if order(a[k]) != order(b[k]):
                problems.append(f"run {a[k]['arm']} seed {a[k]['seed']}: fields in another order")
            values += _count(without_times(a[k]))
        statuses = sorted(r["status"] for r in a.values())
        if problems:
            same = False
            print(f"{name}: {len(a)} runs, DIFFERENT ({len(problems)} differences)")
            for p in problems[:12]:
                print(f"    {p}")
        else:
            print(f"{name}: {len(a)} runs ({', '.join(f'{statuses.count(s)} {s}' for s in sorted(set(statuses)))}), "
                  f"identical: {values} values compared, times aside; same field order")
    return same


def _count(value: Any) -> int:
    if isinstance(value, dict):
        return sum(_count(v) for v in value.values())
    if isinstance(value, list):
        return sum(_count(v) for v in value) or 1
    return 1


def main() -> int:
    if len(sys.argv) != 3:
        print(__doc__.strip().splitlines()[2].strip())
        return 2
    ok = compare(Path(sys.argv[1]), Path(sys.argv[2]))
    print("every path identical" if ok else "DIFFERENCES FOUND")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
