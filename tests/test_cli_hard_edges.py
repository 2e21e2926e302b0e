"""Hard edges of the command line: each is one line on stderr and exit status 2, or just works.

An ``--input-shape`` of more elements than a tensor can hold, a ``--num-classes`` too large to build
(or to hold at all), ``gammaguide report DIR`` for the folder ``ablate --out DIR`` wrote, and two
results files that disagree on a run (named in one warning)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gammaguide.cli import main


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("gammaguide: error:") and "Traceback" not in err
    return err


@pytest.mark.parametrize("shape", ["99999999999999999999,3,32,32", "1,3,99999999999999999999999,32",
                                   "4294967296,4294967296,2,1"])
def test_input_shape_that_no_tensor_holds(shape, capsys):
    assert main(["inspect", "resnet20", "--input-shape", shape]) == 2
    assert "more than a tensor can hold" in one_error_line(capsys)


@pytest.mark.parametrize("classes, message", [
    ("10000000000", "give fewer classes, or add --meta"),
    ("99999999999999999", "give fewer classes"),  # its weight's bytes overflow a tensor's size, also on meta
    ("99999999999999999999999", "give fewer classes"),
])
def test_absurd_num_classes(classes, message, capsys):
    assert main(["inspect", "resnet20", "--num-classes", classes]) == 2
    assert message in one_error_line(capsys)


def test_large_head_on_meta_is_analyzed(capsys):
    assert main(["inspect", "resnet20", "--num-classes", "10000000000", "--meta", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["meta"] and report["counts"]["residual_last"] == 9


def record(arm: str, seed: int, value: float) -> dict:
    settings = {"model": "resnet20", "data": "imagefolder:/x/cifar10-jpeg", "epochs": 15, "weight_decay": 5e-3,
                "policy": arm, "seed": seed}
    return {"key": f"{arm}-{seed}", "arm": arm, "seed": seed, "status": "ok", "test_acc": value,
            "settings": settings, "history": []}


def write(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def grid(shift: float = 0.0) -> list[dict]:
    return [record(arm, s, v + shift) for arm, vs in {"no_gamma": [0.70, 0.80], "guidelines": [0.72, 0.81]}.items()
            for s, v in enumerate(vs)]


def test_report_of_a_folder_reads_its_results(tmp_path, capsys):
    write(tmp_path / "grid" / "results.jsonl", grid())
    assert main(["report", str(tmp_path / "grid"), "--claims"]) == 0
    out = capsys.readouterr().out
    assert f"gammaguide report {tmp_path / 'grid' / 'results.jsonl'} --claims" in out and "n=2" in out
    assert main(["report", str(tmp_path / "grid"), "--out", str(tmp_path / "r"), "--no-plots"]) == 0
    assert (tmp_path / "r" / "report.md").is_file()
    assert main(["report", str(tmp_path / "r"), "--claims"]) == 2  # a folder without results.jsonl
    assert "results file not found" in one_error_line(capsys)


def test_files_that_disagree_on_a_run_are_named(tmp_path, capsys):
    a = write(tmp_path / "a" / "results.jsonl", grid())
    b = write(tmp_path / "b" / "results.jsonl", grid()[:1] + [record("guidelines", 1, 0.5)])
    assert main(["report", str(a), str(b), "--claims"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    warned = [line for line in err if "disagree" in line]
    assert len(warned) == 1 and warned[0].startswith("gammaguide: warning:")
    assert f"guidelines seed 1 of resnet20 · cifar10-jpeg · 15 epochs · wd 5e-3 (test_acc 0.81 in {a}, test_acc 0.5 " \
           f"in {b})" in warned[0]
    assert "disagree on 1 run:" in warned[0]  # the identical copy of no_gamma seed 0 is no conflict


def test_the_same_file_twice_or_a_rerun_within_a_file_is_no_conflict(tmp_path, capsys):
    a = write(tmp_path / "a" / "results.jsonl", grid() + [record("guidelines", 1, 0.5)])
    assert main(["report", str(a), str(a), "--claims"]) == 0
    assert "disagree" not in capsys.readouterr().err
