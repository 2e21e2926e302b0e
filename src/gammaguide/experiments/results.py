"""The results file: one JSON line per finished run, appended atomically.

Each line is written by a single ``write`` on a file opened with ``O_APPEND`` under an
exclusive ``flock`` and then fsynced, so concurrent writers (parallel workers, ranks, shards on
a shared disk) never interleave, and a crash loses at most the run in flight. Every record
carries the version of its format, ``schema`` (``SCHEMA``; a record without one is version 1).
Reading keeps every good line and skips, with one warning that counts and locates them, the
lines that are corrupt or truncated and the records of a schema version this code does not know.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

RESULTS_NAME = "results.jsonl"
# The format of the records this code writes (``RunRecord.schema``) and those it reads. Version 1
# is the first format; fields added later (``metric``, ...) are optional to readers, so adding one
# keeps the version: only a change that old readers would misread needs a new one.
SCHEMA = 1
READABLE_SCHEMAS = frozenset({1})


@dataclass(frozen=True)
class Skipped:
    """A line of a results file that reading skipped."""

    path: Path
    line: int
    why: str  # "corrupt or truncated" or "schema version N, unknown to this gammaguide"


@dataclass
class RunRecord:
    """What one run leaves in the results file (as one JSON line)."""

    key: str
    arm: str
    seed: int
    status: str  # "ok" | "failed"
    reason: str | None
    test_acc: float | None
    model: str
    data: str
    epochs: int
    settings: dict[str, Any]
    schema: int = SCHEMA  # the format of this record; records without one are version 1
    history: list[dict[str, Any]] = field(default_factory=list)
    roles: dict[str, dict[str, int]] = field(default_factory=dict)  # role -> {"count", "decayed"}
    train_images_per_s: float | None = None
    wall_s: float | None = None
    environment: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TextRunRecord(RunRecord):
    """A text run's line: the image record's fields plus the primary metric's name and BLEU."""

    metric: str = "test_acc"
    test_bleu: float | None = None
    bleu_signature: str | None = None
    train_tokens_per_s: float | None = None
    hypotheses: list[str] | None = None  # translation: the final test-set output, to rescore elsewhere


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


def read_results(paths: str | os.PathLike | Iterable[str | os.PathLike]
                 ) -> tuple[list[dict[str, Any]], list[Skipped]]:
    """Every readable record of one or more results files, and the lines skipped."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    records: list[dict[str, Any]] = []
    skipped: list[Skipped] = []
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
                except (ValueError, UnicodeDecodeError):
                    rec = None
                if not isinstance(rec, dict):
                    skipped.append(Skipped(path, number, "corrupt or truncated"))
                    continue
                schema = rec.get("schema", 1)
                if type(schema) is not int or schema not in READABLE_SCHEMAS:
                    skipped.append(Skipped(path, number, f"schema version {schema!r}, unknown to this gammaguide"))
                    continue
                records.append(rec)
    return records, skipped


def describe_skipped(skipped: list[Skipped]) -> str:
    """One line for all the skipped lines: how many, where and why."""
    by_cause: dict[tuple[Path, str], list[int]] = {}
    for s in skipped:
        by_cause.setdefault((s.path, s.why), []).append(s.line)
    parts = [f"{path}: {_lines(numbers)} ({why})" for (path, why), numbers in by_cause.items()]
    n = len(skipped)
    return f"{n} unreadable results line{'s' * (n != 1)} skipped: {'; '.join(parts)}"


def _lines(numbers: list[int], limit: int = 8) -> str:
    """``[2, 3, 4, 9]`` -> ``lines 2-4, 9``."""
    spans: list[list[int]] = []
    for n in numbers:
        if spans and n == spans[-1][1] + 1:
            spans[-1][1] = n
        else:
            spans.append([n, n])
    text = ", ".join(f"{a}-{b}" if b > a else f"{a}" for a, b in spans[:limit])
    more = f" and {len(spans) - limit} more ranges" if len(spans) > limit else ""
    return f"line{'s' * (len(numbers) > 1)} {text}{more}"


def read_lines(paths: str | os.PathLike | Iterable[str | os.PathLike], *, warn: bool = True) -> list[dict[str, Any]]:
    """Every readable record of one or more results files; the skipped lines get one warning."""
    records, skipped = read_results(paths)
    if warn and skipped:
        warnings.warn(f"{describe_skipped(skipped)}; the other lines are kept", stacklevel=2)
    return records


def usable_runs(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records a report can use: finished runs with their primary metric (``metric``, by
    default ``test_acc``) a number."""
    return [r for r in records if r.get("status") == "ok" and "arm" in r and "seed" in r
            and isinstance(r.get(r.get("metric") or "test_acc"), (int, float))]


def finished_keys(path: str | os.PathLike, *, retry_failed: bool = False) -> set[str]:
    """Keys of the runs already in the results file (failed ones too, unless ``retry_failed``)."""
    return {
        r["key"] for r in read_lines(path, warn=False)
        if "key" in r and (r.get("status") == "ok" or not retry_failed)
    }
