"""The results file: one JSON line per finished run, appended atomically.

Each line is written by a single ``write`` on a file opened with ``O_APPEND`` under an
exclusive ``flock`` and then fsynced, so concurrent writers (parallel workers, ranks, shards on
a shared disk) never interleave, and a crash loses at most the run in flight. Reading skips a
corrupt or truncated line with a warning and keeps every good one.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import warnings
from pathlib import Path
from typing import Any, Iterable

RESULTS_NAME = "results.jsonl"


def run_key(settings: dict[str, Any]) -> str:
    """A stable id of a run's settings (which arm, seed, model, data, schedule...)."""
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _clean(obj: Any) -> Any:
    """JSON has no NaN or infinity; write them as null so that every reader can parse the line."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def append_line(path: str | os.PathLike, record: dict[str, Any]) -> None:
    """Append ``record`` as one JSON line, atomically with respect to other writers."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = (json.dumps(_clean(record), allow_nan=False, sort_keys=False) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        # A previous writer killed mid-line leaves no newline at the end: start on a fresh
        # line so that the damage stays confined to that one bad line.
        size = os.fstat(fd).st_size
        if size:
            with open(path, "rb") as f:
                f.seek(size - 1)
                if f.read(1) != b"\n":
                    data = b"\n" + data
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def read_lines(paths: str | os.PathLike | Iterable[str | os.PathLike], *, warn: bool = True) -> list[dict[str, Any]]:
    """Every well-formed record of one or more results files; bad lines are skipped with a warning."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    records = []
    for path in paths:
        path = Path(path)
        if not path.exists():
            continue
        with open(path, "rb") as f:
            for number, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                try:
                    rec = json.loads(raw)
                    if not isinstance(rec, dict):
                        raise ValueError("not a JSON object")
                except (ValueError, UnicodeDecodeError) as exc:
                    if warn:
                        warnings.warn(f"{path}:{number}: skipping a corrupt or truncated line ({exc})")
                    continue
                records.append(rec)
    return records


def finished_keys(path: str | os.PathLike, *, retry_failed: bool = False) -> set[str]:
    """Keys of the runs already in the results file (failed ones too, unless ``retry_failed``)."""
    return {
        r["key"] for r in read_lines(path, warn=False)
        if "key" in r and (r.get("status") == "ok" or not retry_failed)
    }
