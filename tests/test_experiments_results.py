"""The results file (experiments/results.py) on its own: what a line holds, what reading keeps and
skips, and how the skipped lines are described. No training: these run in milliseconds."""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

import pytest

from gammaguide.experiments import results as R


def ok(key: str, arm: str = "guidelines", seed: int = 0, **more) -> dict:
    return {"key": key, "arm": arm, "seed": seed, "status": "ok", "test_acc": 0.5, **more}


def test_a_record_is_one_json_line_with_non_finite_numbers_as_null(tmp_path):
    path = tmp_path / "deep" / "down" / R.RESULTS_NAME  # folders are made
    R.append_line(path, ok("a", history=[{"loss": float("nan")}, {"loss": float("inf")}], pair=(1.5, -float("inf"))))
    R.append_line(str(path), ok("b"))
    text = path.read_text()
    assert text.count("\n") == 2 and text.endswith("\n")
    first = json.loads(text.splitlines()[0])
    assert first["history"] == [{"loss": None}, {"loss": None}] and first["pair"] == [1.5, None]
    assert [r["key"] for r in R.read_lines(path)] == ["a", "b"]


def test_a_line_cut_short_by_a_crash_stays_alone(tmp_path):
    path = tmp_path / R.RESULTS_NAME
    R.append_line(path, ok("a"))
    with open(path, "ab") as f:
        f.write(b'{"key": "cut", "arm"')  # a writer killed mid-line: no newline
    R.append_line(path, ok("b"))
    lines = path.read_bytes().split(b"\n")
    assert lines[1] == b'{"key": "cut", "arm"' and json.loads(lines[2])["key"] == "b"
    records, skipped = R.read_results(path)
    assert [r["key"] for r in records] == ["a", "b"]
    assert skipped == [R.Skipped(path, 2, "corrupt or truncated")]


def test_reading_keeps_good_lines_and_says_which_it_skipped(tmp_path):
    path = tmp_path / R.RESULTS_NAME
    lines = [
        json.dumps(ok("v1")),                       # 1: no schema: version 1
        "",                                         # 2: blank, ignored
        json.dumps({**ok("v1b"), "schema": 1}),     # 3
        "not json",                                 # 4
        json.dumps([1, 2]),                         # 5: JSON, not a record
        json.dumps({**ok("v2"), "schema": 2}),      # 6: a newer format
        json.dumps({**ok("bool"), "schema": True}),  # 7: True == 1, but no version
    ]
    path.write_bytes("\n".join(lines).encode() + b"\n\x80\x81 not UTF-8\n")  # 8
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps(ok("other")) + "\n")
    records, skipped = R.read_results([path, tmp_path / "missing.jsonl", other])
    assert [r["key"] for r in records] == ["v1", "v1b", "other"]
    assert [(s.path, s.line, s.why) for s in skipped] == [
        (path, 4, "corrupt or truncated"), (path, 5, "corrupt or truncated"),
        (path, 6, "schema version 2, unknown to this gammaguide"),
        (path, 7, "schema version True, unknown to this gammaguide"),
        (path, 8, "corrupt or truncated"),
    ]
    assert R.describe_skipped(skipped) == (
        f"5 unreadable results lines skipped: {path}: lines 4-5, 8 (corrupt or truncated); "
        f"{path}: line 6 (schema version 2, unknown to this gammaguide); "
        f"{path}: line 7 (schema version True, unknown to this gammaguide)")
    with pytest.warns(UserWarning) as record:
        kept = R.read_lines([path, other])
    assert kept == records and len(record) == 1
    assert str(record[0].message) == f"{R.describe_skipped(skipped)}; the other lines are kept"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert R.read_lines([path, other], warn=False) == records


def test_one_skipped_line_is_described_in_the_singular():
    skipped = [R.Skipped(Path("r.jsonl"), 3, "corrupt or truncated")]
    assert R.describe_skipped(skipped) == "1 unreadable results line skipped: r.jsonl: line 3 (corrupt or truncated)"


def test_many_skipped_ranges_are_cut_after_eight():
    numbers = [1, 2, 3, 5, 7, 9, 11, 13, 15, 17, 19, 20, 22]  # ten ranges
    assert R._lines(numbers) == "lines 1-3, 5, 7, 9, 11, 13, 15, 17 and 2 more ranges"
    assert R._lines(numbers[:10]) == "lines 1-3, 5, 7, 9, 11, 13, 15, 17"
    assert R._lines([4]) == "line 4" and R._lines([4, 5]) == "lines 4-5"


def test_usable_runs_are_finished_with_their_metric_a_number():
    runs = [
        ok("a"),
        {**ok("failed"), "status": "failed"},
        {k: v for k, v in ok("no arm").items() if k != "arm"},
        {k: v for k, v in ok("no seed").items() if k != "seed"},
        {**ok("null"), "test_acc": None},                   # NaN written as null
        {**ok("bleu"), "metric": "test_bleu", "test_bleu": 21},  # its own metric, an int
        {**ok("no bleu"), "metric": "test_bleu"},           # names a metric it lacks
        {**ok("text"), "test_acc": "0.5"},
    ]
    assert [r["key"] for r in R.usable_runs(runs)] == ["a", "bleu"]


def test_finished_keys_with_and_without_the_failed_runs(tmp_path):
    path = tmp_path / R.RESULTS_NAME
    for record in (ok("a"), {**ok("b"), "status": "failed"}, {"arm": "no key", "status": "ok"}):
        R.append_line(path, record)
    assert R.finished_keys(path) == {"a", "b"}
    assert R.finished_keys(path, retry_failed=True) == {"a"}
    assert R.finished_keys(tmp_path / "none.jsonl") == set()


def test_run_key_depends_on_the_settings_not_their_order():
    a = R.run_key({"arm": "guidelines", "seed": 0, "path": Path("x")})
    assert a == R.run_key({"path": Path("x"), "seed": 0, "arm": "guidelines"})
    assert len(a) == 16 and int(a, 16) >= 0
    assert a != R.run_key({"arm": "guidelines", "seed": 1, "path": Path("x")})
    assert R.run_key({"arm": "all"}) == "dca8133f0bb912e0"  # stable across versions: resumed grids rely on it


def test_a_line_keeps_the_records_field_order_and_the_file_is_readable_by_all(tmp_path):
    # Field order is part of what the identical-records check compares (scripts/compare_records.py):
    # a record reads as written. The file is rw-r--r-- whatever mode os.open would default to.
    old = os.umask(0o022)
    try:
        path = tmp_path / R.RESULTS_NAME
        R.append_line(path, {"key": "a", "zeta": 1, "alpha": 2})
    finally:
        os.umask(old)
    assert path.read_text() == '{"key": "a", "zeta": 1, "alpha": 2}\n'
    assert path.stat().st_mode & 0o777 == 0o644


def test_a_run_records_json_is_every_field_in_order():
    rec = R.RunRecord(key="k", arm="guidelines", seed=3, status="ok", reason=None, test_acc=0.5, model="resnet20",
                      data="synthetic", epochs=2, settings={"lr": 0.1})
    d = rec.to_json()
    assert list(d)[:11] == ["key", "arm", "seed", "status", "reason", "test_acc", "model", "data", "epochs",
                            "settings", "schema"]
    assert d["seed"] == 3 and d["settings"] == {"lr": 0.1} and d["schema"] == R.SCHEMA and d["history"] == []


def test_finished_keys_reads_quietly_and_read_lines_warns_at_its_caller(tmp_path):
    path = tmp_path / R.RESULTS_NAME
    R.append_line(path, ok("a"))
    with open(path, "ab") as f:
        f.write(b"not json\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert R.finished_keys(path) == {"a"}
    with pytest.warns(UserWarning, match="the other lines are kept") as caught:
        R.read_lines(path)
    if "mutmut" not in sys.modules:  # under mutation testing a trampoline frame sits between us and it
        assert caught[0].filename == __file__
