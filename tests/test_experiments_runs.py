"""Training runs, the ablation grid (resume, shards), results files and reports, end to end on a
tiny generated ImageFolder tree."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from gammaguide import GammaGuideError
from gammaguide.cli import main
from gammaguide.experiments import data as D, grid as ablate, results as R
from gammaguide.experiments.distributed import DistContext
from gammaguide.experiments.report import summarize, write_report
from gammaguide.experiments.config import TrainConfig, lr_factor
from gammaguide.experiments.trainer import Trainer

from experiment_helpers import interrupt_in_epoch_two, make_imagefolder

# The tiny ImageFolder ``tree`` and the dataset cache in a temporary folder come from conftest.py.
pytestmark = pytest.mark.usefixtures("dataset_cache")

CPU = DistContext(0, 1, 0, torch.device("cpu"))
TINY = dict(model="resnet20", epochs=2, batch_size=16, variance_batch=8)


@pytest.fixture(scope="module")
def dataset(tree, tmp_path_factory):
    os.environ[D.CACHE_ENV] = str(tmp_path_factory.getbasetemp() / "cache")
    return D.load_dataset(f"imagefolder:{tree}", progress=False)


def _cfg(tree, **changes) -> TrainConfig:
    return replace(TrainConfig(data=f"imagefolder:{tree}", **TINY), **changes)


def _why(proc: subprocess.CompletedProcess) -> str:
    """What a failed subprocess said: torchrun puts the ranks' tracebacks far from the end."""
    lines = proc.stderr.splitlines()
    telling = [line for line in lines if "Error" in line or "rank" in line or "error" in line]
    return "\n".join(telling[:80] + ["..."] + lines[-20:])


def _env(tmp_path_factory) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env[D.CACHE_ENV] = str(tmp_path_factory.getbasetemp() / "cache")
    return env


# ----------------------------------------------------------------------------- one run


def test_one_run_records_everything(tree, dataset):
    record = Trainer(_cfg(tree), dataset, CPU, progress=False).run()
    assert record.status == "ok" and record.reason is None
    assert record.arm == "guidelines" and record.seed == 0 and record.epochs == 2
    assert 0.0 <= record.test_acc <= 1.0
    assert record.roles == {"residual_last": {"count": 9, "decayed": 9}, "scale_invariant": {"count": 9, "decayed": 9},
                            "shortcut": {"count": 2, "decayed": 0}, "stream": {"count": 1, "decayed": 0}}
    assert [h["epoch"] for h in record.history] == [1, 2]
    last = record.history[-1]
    assert set(last["gamma_abs"]) == {"residual_last", "scale_invariant", "shortcut", "stream"}
    assert last["gamma_eff_lr"]["scale_invariant"] > 0 and last["weight_eff_lr"] > 0
    # analysis 1: one ratio per residual add of resnet20 (9 blocks)
    assert len(last["variance_ratio"]) == 9 and all(v > 0 for v in last["variance_ratio"].values())
    assert record.settings["policy"] == "guidelines" and record.key == _cfg(tree).key()
    json.dumps(record.to_json())  # serialisable as one line


def test_same_seed_same_result_and_seed_pairs_arms(tree, dataset):
    a = Trainer(_cfg(tree, epochs=1), dataset, CPU, progress=False).run()
    b = Trainer(_cfg(tree, epochs=1), dataset, CPU, progress=False).run()
    assert a.history[-1]["train_loss"] == b.history[-1]["train_loss"] and a.test_acc == b.test_acc
    # Another arm with the same seed starts from the same weights and batches: its first
    # epoch's loss differs only through weight decay on some γ (tiny after a few steps).
    c = Trainer(_cfg(tree, epochs=1, policy="all"), dataset, CPU, progress=False)
    assert all(torch.equal(p, q) for p, q in zip(c.model.state_dict().values(),
                                                  Trainer(_cfg(tree, epochs=1), dataset, CPU,
                                                          progress=False).model.state_dict().values(), strict=True))
    c_loss = c.run().history[-1]["train_loss"]
    assert abs(c_loss - a.history[-1]["train_loss"]) < 1e-2
    d = Trainer(_cfg(tree, epochs=1, seed=1), dataset, CPU, progress=False).run()
    assert d.history[-1]["train_loss"] != a.history[-1]["train_loss"]


def test_non_finite_loss_stops_the_run_as_failed(tree, dataset):
    record = Trainer(_cfg(tree, lr=1e12, epochs=3), dataset, CPU, progress=False).run()
    assert record.status == "failed" and "non-finite" in record.reason
    assert record.test_acc is None and len(record.history) < 3


def test_killed_run_resumes_from_its_checkpoint_with_the_same_result(tree, dataset, tmp_path):
    whole = Trainer(_cfg(tree), dataset, CPU, progress=False).run()
    ckpt = tmp_path / "run.pt"
    interrupt_in_epoch_two(Trainer(_cfg(tree), dataset, CPU, progress=False, checkpoint=ckpt))
    assert ckpt.is_file()
    resumed = Trainer(_cfg(tree), dataset, CPU, progress=False, checkpoint=ckpt)
    assert resumed.start_epoch == 1
    record = resumed.run()
    for h, w in zip(record.history, whole.history, strict=True):
        assert h["train_loss"] == w["train_loss"] and h["test_acc"] == w["test_acc"]
    resumed.discard_checkpoint()
    assert not ckpt.exists()


def test_lr_schedules():
    assert lr_factor(0, 100, "cosine") == 1.0 and lr_factor(100, 100, "cosine") == pytest.approx(0.0)
    assert lr_factor(50, 100, "cosine") == pytest.approx(0.5)
    assert lr_factor(0, 100, "onecycle") == pytest.approx(1 / 25)
    assert lr_factor(30, 100, "onecycle") == pytest.approx(1.0)
    assert lr_factor(100, 100, "onecycle") < 1e-4
    assert lr_factor(0, 100, "cosine", warmup=10) == pytest.approx(0.1)


# ----------------------------------------------------------------------------- the grid


def _lines(path: Path) -> list[dict]:
    return R.read_lines(path)


def test_grid_skips_finished_runs_and_shards_partition_it(tree, tmp_path):
    configs = ablate.grid(_cfg(tree, epochs=1), ("no_gamma", "all", "only:stream"), (0, 1))
    assert [(c.policy, c.seed) for c in configs][:3] == [("no_gamma", 0), ("all", 0), ("only:stream", 0)]
    quiet = dict(progress=False, log=lambda m: None)
    for i in range(2):
        ablate.run_grid(configs, tmp_path / f"shard{i}", shard=(i, 2), **quiet)
    merged = tmp_path / "merged.jsonl"
    merged.write_bytes(b"".join((tmp_path / f"shard{i}" / R.RESULTS_NAME).read_bytes() for i in range(2)))
    keys = [r["key"] for r in _lines(merged)]
    assert sorted(keys) == sorted(c.key() for c in configs)  # every run exactly once
    # the same command again runs nothing
    assert ablate.run_grid(configs, tmp_path / "shard0", shard=(0, 2), **quiet) == []
    assert len(_lines(tmp_path / "shard0" / R.RESULTS_NAME)) == 3


def test_ablate_killed_with_sigkill_loses_at_most_the_run_in_flight(tree, tmp_path_factory, tmp_path):
    out = tmp_path / "grid"
    cmd = [sys.executable, "-m", "gammaguide", "ablate", "--protocol", "smoke", "--data", f"imagefolder:{tree}",
           "--arms", "no_gamma,all,guidelines", "--epochs", "2", "--batch-size", "16", "--subset", "80",
           "--test-subset", "30", "--out", str(out), "--no-report"]
    proc = subprocess.Popen(cmd, env=_env(tmp_path_factory), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    results = out / R.RESULTS_NAME
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if results.exists() and results.read_bytes().count(b"\n") >= 1:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = _lines(results)
    assert 1 <= len(before) < 3, "the kill should land inside the grid"
    done = subprocess.run(cmd, env=_env(tmp_path_factory), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    after = _lines(results)
    assert len(after) == 3 and len({r["key"] for r in after}) == 3  # no duplicate, no loss
    assert after[:len(before)] == before  # finished lines untouched
    assert {r["arm"] for r in after} == {"no_gamma", "all", "guidelines"}


def test_a_crashing_run_is_recorded_as_failed_and_the_grid_goes_on(tree, tmp_path, monkeypatch):
    real_run = Trainer.run

    def crash_for_all(self):
        if self.cfg.policy == "all":
            raise RuntimeError("simulated out of memory")
        return real_run(self)

    monkeypatch.setattr(Trainer, "run", crash_for_all)
    configs = ablate.grid(_cfg(tree, epochs=1), ("all", "no_gamma"), (0,))
    ablate.run_grid(configs, tmp_path, progress=False, log=lambda m: None)
    lines = {r["arm"]: r for r in _lines(tmp_path / R.RESULTS_NAME)}
    assert lines["all"]["status"] == "failed" and "simulated out of memory" in lines["all"]["reason"]
    assert lines["no_gamma"]["status"] == "ok"
    # a rerun skips the failed run unless asked to retry it
    assert ablate.run_grid(configs, tmp_path, progress=False, log=lambda m: None) == []
    monkeypatch.setattr(Trainer, "run", real_run)
    rerun = ablate.run_grid(configs, tmp_path, progress=False, log=lambda m: None, retry_failed=True)
    assert [c.policy for c in rerun] == ["all"]


def test_parallel_workers_write_one_line_per_run(tree, tmp_path):
    configs = ablate.grid(_cfg(tree, epochs=1, batch_size=32), ("no_gamma", "all"), (0,))
    ablate.run_grid(configs, tmp_path, jobs=2, progress=False, log=lambda m: None)
    assert sorted(r["arm"] for r in _lines(tmp_path / R.RESULTS_NAME)) == ["all", "no_gamma"]


# ----------------------------------------------------------------------------- results files


def test_results_file_survives_a_truncated_line(tmp_path):
    path = tmp_path / "r.jsonl"
    R.append_line(path, {"key": "a", "arm": "x", "seed": 0, "status": "ok", "test_acc": 0.5})
    with open(path, "ab") as f:
        f.write(b'{"key": "b", "arm": "x", "se')  # a writer killed mid-line
    R.append_line(path, {"key": "c", "arm": "y", "seed": 0, "status": "ok", "test_acc": float("nan")})
    with pytest.warns(UserWarning, match=r"r.jsonl: line 2 \(corrupt or truncated\)"):
        lines = R.read_lines(path)
    assert [r["key"] for r in lines] == ["a", "c"]
    assert lines[1]["test_acc"] is None  # NaN is written as null, so every JSON reader can parse it
    assert R.finished_keys(path) == {"a", "c"}


def _fake_run(arm: str, seed: int, acc: float, status: str = "ok") -> dict:
    history = [{"epoch": e, "lr": 0.1, "train_loss": 1.0, "train_acc": 0.5, "test_acc": acc,
                "gamma_abs": {"residual_last": 1.0 - 0.1 * e, "stream": 1.0},
                "gamma_eff_lr": {"scale_invariant": 0.01 * e}, "weight_eff_lr": 0.001,
                "variance_ratio": {"layers.0.0": 0.5, "layers.0.1": 0.25}} for e in (1, 2)]
    return {"key": f"{arm}{seed}", "arm": arm, "seed": seed, "status": status,
            "test_acc": acc if status == "ok" else None, "settings": {"model": "resnet20", "data": "d", "epochs": 2,
                                                                     "policy": arm, "seed": seed},
            "history": history}


def test_report_from_a_hand_made_results_file(tmp_path):
    path = tmp_path / "results.jsonl"
    runs = [_fake_run("no_gamma", 0, 0.80), _fake_run("no_gamma", 1, 0.70),
            _fake_run("guidelines", 0, 0.83), _fake_run("guidelines", 1, 0.74),
            _fake_run("all", 0, 0.81), _fake_run("all", 1, 0.0, status="failed")]
    path.write_text("".join(json.dumps(r) + "\n" for r in runs) + "{not json\n")
    (exp,) = summarize(R.read_lines(path, warn=False))
    by_arm = {a.arm: a for a in exp.arms}
    g = by_arm["guidelines"]
    assert g.mean == pytest.approx(0.785) and g.sd == pytest.approx(0.0636396, rel=1e-4)
    d = g.paired["no_gamma"]  # differences 0.03 and 0.04: standard error 0.005, t(0.975, 1 df) = 12.706
    assert (d.mean, d.n) == (pytest.approx(0.035), 2) and d.high - d.mean == pytest.approx(12.706 * 0.005, rel=1e-4)
    assert by_arm["all"].failed == 1 and list(by_arm["all"].values) == [0]
    assert (g.paired["all"].mean, g.paired["all"].n, g.paired["all"].low) == (pytest.approx(0.02), 1, None)
    with pytest.warns(UserWarning, match="corrupt"):
        report = write_report(path, tmp_path / "out")
    text = report.read_text()
    assert "| guidelines | 2 | 0 | 78.50 ± 6.36 | +3.50 [-2.85, +9.85], n=2 | +2.00, n=1: no interval (n < 2) |" in text
    assert "| all | 1 | 1 | 81.00 |" in text
    for png in ("accuracy.png", "gamma.png", "effective_lr.png", "variance_ratio.png"):
        assert (tmp_path / "out" / png).stat().st_size > 5000
        assert f"]({png})" in text


# ----------------------------------------------------------------------------- command line


def test_train_command_appends_one_line(tree, tmp_path, capsys):
    out = tmp_path / "runs"
    code = main(["train", "--data", f"imagefolder:{tree}", "--epochs", "1", "--batch-size", "16", "--policy",
                 "only:stream", "--seed", "3", "--out", str(out), "--no-progress"])
    assert code == 0
    (line,) = _lines(out / R.RESULTS_NAME)
    assert line["arm"] == "only:stream" and line["seed"] == 3 and line["status"] == "ok"
    assert line["roles"]["stream"] == {"count": 1, "decayed": 1}
    assert not (out / "checkpoints").exists()  # removed once the run is finished
    assert "test accuracy" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["train", "--data", "imagenet", "--out", "x"], "unknown data spec"),
    (["train", "--data", "cifar10", "--policy", "some", "--out", "x"], "unknown policy"),
    (["train", "--data", "cifar10", "--epochs", "0", "--out", "x"], "--epochs"),
    (["train", "--data", "cifar10", "--depth", "21", "--out", "x"], "6n+2"),
    (["ablate", "--protocol", "huge", "--data", "cifar10", "--out", "x"], "unknown --protocol"),
    (["ablate", "--data", "cifar10", "--shard", "2/2", "--out", "x"], "bad --shard"),
    (["ablate", "--data", "cifar10", "--seeds", "a,b", "--out", "x"], "bad --seeds"),
    (["ablate", "--data", "cifar10", "--arms", "all,all", "--out", "x"], "twice"),
    (["ablate", "--data", "cifar10", "--epochs", "auto", "--out", "x"], "--time-budget"),
    (["report", "missing.jsonl", "--out", "x"], "results file not found"),
])
def test_command_line_errors_are_one_line_and_status_2(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("gammaguide: error:") and message in err


def test_sync_bn_on_cpu_under_torchrun_is_refused(tree, dataset):
    with pytest.raises(GammaGuideError, match="SyncBatchNorm runs only on GPUs"):
        Trainer(_cfg(tree, sync_bn=True), dataset, DistContext(0, 2, 0, torch.device("cpu")), progress=False)


# ----------------------------------------------------------------------------- torchrun


def test_torchrun_two_processes_match_one_process(tmp_path_factory, tmp_path):
    """2 processes (gloo, DDP + DistributedSampler) see exactly the single process's global
    batches, crops and flips from the same initial weights. What remains different is
    BatchNorm: each rank normalizes its half of the batch with that half's statistics
    (PyTorch's SyncBatchNorm is GPU-only), which perturbs every step a little, and the
    perturbation grows with training. So the comparison is one epoch at a gentle learning rate:
    on this 320-image tree, for seeds 0, 1, 2, the epoch's training loss differed by 1.1%, 0.6%
    and 1.7% and test accuracy by 0, 0 and 2 points (of 100 test images). We allow 3% and 5
    points. (After a second epoch the gaps grew to 4-9% and 4-10 points.)"""
    tree = make_imagefolder(tmp_path_factory.mktemp("ddp") / "tree", per_class=32, test_per_class=10)
    common = ["train", "--data", f"imagefolder:{tree}", "--epochs", "1", "--batch-size", "64", "--lr", "0.02",
              "--out", str(tmp_path), "--no-progress"]
    env = _env(tmp_path_factory)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                "-m", "gammaguide"]
    two = subprocess.run(torchrun + common, env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, _why(two)
    one = subprocess.run([sys.executable, "-m", "gammaguide"] + common, env=env, capture_output=True, text=True,
                         timeout=300)
    assert one.returncode == 0, _why(one)
    lines = _lines(tmp_path / R.RESULTS_NAME)
    assert [r["environment"]["world_size"] for r in lines] == [2, 1]  # rank 0 alone wrote, once
    ddp, single = lines
    assert ddp["key"] == single["key"]
    assert ddp["history"][0]["train_loss"] == pytest.approx(single["history"][0]["train_loss"], rel=0.03)
    assert abs(ddp["test_acc"] - single["test_acc"]) <= 0.05
    assert two.stderr.count("epoch 1/1") == 1  # rank 0 alone logs


@pytest.mark.parametrize("argv", [["train", "--data", "cifar10", "--out", "x", "--batch-size", "abc"],
                                  ["ablate", "--out", "x"], ["frobnicate"]])
def test_usage_errors_are_one_line_and_status_2(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("gammaguide: error:") and "--help" in err


def test_epoch_test_subset_applies_to_every_epoch_but_the_last(tree, dataset):
    record = Trainer(_cfg(tree, epoch_test_subset=10), dataset, CPU, progress=False).run()
    assert [h["test_images"] for h in record.history] == [10, 30]
    assert record.test_acc == record.history[-1]["test_acc"]


def test_torchrun_ablate_writes_each_run_once(tree, tmp_path_factory, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "gammaguide",
           "ablate", "--protocol", "smoke", "--data", f"imagefolder:{tree}", "--arms", "no_gamma,guidelines",
           "--batch-size", "16", "--subset", "80", "--test-subset", "30", "--out", str(tmp_path), "--no-report"]
    done = subprocess.run(cmd, env=_env(tmp_path_factory), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, _why(done)
    lines = _lines(tmp_path / R.RESULTS_NAME)
    assert sorted(r["arm"] for r in lines) == ["guidelines", "no_gamma"]
    assert {r["environment"]["world_size"] for r in lines} == {2}


def test_variance_probe_batch_is_fixed_and_class_balanced(tree, dataset):
    """The test set is stored class by class: its first images would all be one class."""
    a = Trainer(_cfg(tree, variance_batch=10), dataset, CPU, progress=False)
    assert sorted(a.variance_y.tolist()) == list(range(10))
    b = Trainer(_cfg(tree, variance_batch=10, seed=1, policy="all"), dataset, CPU, progress=False)
    assert torch.equal(a.variance_x, b.variance_x)  # the same images for every arm and seed
    small = Trainer(_cfg(tree, variance_batch=4), dataset, CPU, progress=False)  # fewer than the classes
    assert len(small.variance_x) == 4
