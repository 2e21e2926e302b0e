"""Text runs end to end on a few hundred generated sentences: classification and translation
through the command line, the record's metric, pairing, resuming, batches and schedule."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from gammaguide.cli import main
from gammaguide.experiments import protocols as ablate, text_data as T
from gammaguide.experiments.data import CACHE_ENV, DATA_ENV
from gammaguide.experiments.distributed import DistContext
from gammaguide.experiments.results import read_lines
from gammaguide.experiments.config import TextConfig, text_lr_factor
from gammaguide.experiments.text_task import default_arms, length_batches, load_data
from gammaguide.experiments.trainer import Trainer as TextTrainer

from text_helpers import make_multi30k, make_sst2

CPU = DistContext(0, 1, 0, torch.device("cpu"))
TINY = dict(width=16, layers=1, heads=2, vocab_size=120, max_len=24, batch_size=32, variance_batch=16)


@pytest.fixture(autouse=True)
def _env(tmp_path_factory, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path_factory.getbasetemp() / "cache"))
    monkeypatch.delenv(DATA_ENV, raising=False)


@pytest.fixture(scope="module")
def sst2(tmp_path_factory):
    return make_sst2(tmp_path_factory.mktemp("text") / "sst2", train=320, dev=64)


@pytest.fixture(scope="module")
def m30k(tmp_path_factory):
    return make_multi30k(tmp_path_factory.mktemp("text") / "m30k", train=320, valid=32, test=24)


def _cfg(root, **changes) -> TextConfig:
    return replace(TextConfig(data=f"sst2:{root}", epochs=2, **TINY), **changes)


def _lines(out) -> list[dict]:
    return read_lines(out / "results.jsonl")


def test_sst2_grid_end_to_end(sst2, tmp_path, capsys):
    out = tmp_path / "grid"
    argv = ["ablate", "--protocol", "sst2-smoke", "--data", f"sst2:{sst2}", "--arms", "no_gamma,all",
            "--seeds", "0,1", "--vocab-size", "120", "--subset", "320", "--test-subset", "64", "--out", str(out)]
    assert main(argv) == 0
    recs = _lines(out)
    assert sorted((r["arm"], r["seed"]) for r in recs) == [("all", 0), ("all", 1), ("no_gamma", 0), ("no_gamma", 1)]
    for r in recs:
        assert r["status"] == "ok" and r["metric"] == "test_acc" and 0 <= r["test_acc"] <= 1
        assert r["test_bleu"] is None and r["settings"]["optimizer"] == "adamw"
        assert r["roles"] == {"residual_last": {"count": 2, "decayed": 2 * (r["arm"] == "all")},
                              "head": {"count": 1, "decayed": int(r["arm"] == "all")}}
        row = r["history"][-1]
        assert set(row["gamma_abs"]) == {"residual_last", "head"}
        assert len(row["variance_ratio"]) == 2 and all(v > 0 for v in row["variance_ratio"].values())
        assert row["test_sentences"] == 64 and r["train_tokens_per_s"] > 0
    assert (out / "report.md").is_file() and (out / "accuracy.png").is_file()
    # L2 on γ shrinks them: `all` ends with smaller |γ| than `no_gamma`, seed by seed
    by = {(r["arm"], r["seed"]): r["history"][-1]["gamma_abs"]["residual_last"] for r in recs}
    assert by[("all", 0)] < by[("no_gamma", 0)] and by[("all", 1)] < by[("no_gamma", 1)]
    # a rerun finds every run done
    capsys.readouterr()
    assert main(argv) == 0
    assert "4 already in" in capsys.readouterr().err and len(_lines(out)) == 4


def test_translation_run_end_to_end(m30k, tmp_path, capsys):
    out = tmp_path / "mt"
    argv = ["train", "--data", f"multi30k:{m30k}", "--model", "seq2seq_preln", "--epochs", "2", "--width", "32",
            "--layers", "1", "--heads", "2", "--vocab-size", "120", "--max-len", "32", "--batch-size", "32",
            "--lr", "3e-3", "--no-progress", "--out", str(out)]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "sacrebleu signature: nrefs:1|case:mixed|eff:no|tok:13a" in err
    (r,) = _lines(out)
    assert r["metric"] == "test_bleu" and r["test_acc"] is None and 0 <= r["test_bleu"] <= 100
    assert r["bleu_signature"].startswith("nrefs:1|") and len(r["hypotheses"]) == 24
    assert r["settings"]["label_smoothing"] == 0.1 and r["settings"]["schedule"] == "cosine"
    assert r["roles"] == {"residual_last": {"count": 6, "decayed": 6}, "head": {"count": 1, "decayed": 0}}
    assert [h["epoch"] for h in r["history"]] == [1, 2] and r["history"][-1]["valid_loss"] > 0
    assert len(r["history"][-1]["variance_ratio"]) == 5  # 2 encoder adds, 3 decoder adds
    # the hypotheses are what BLEU was computed on: rescoring them gives the same number
    from gammaguide.experiments.bleu import corpus_bleu

    refs = (m30k / "raw" / "test_2016_flickr.en").read_text().splitlines()
    assert corpus_bleu(r["hypotheses"], refs).score == pytest.approx(r["test_bleu"])


def test_a_text_option_error_is_one_line(sst2, m30k, tmp_path, capsys):
    cases = [
        (["train", "--data", f"sst2:{sst2}", "--model", "seq2seq_preln"], "does not fit sst2"),
        (["train", "--data", f"sst2:{sst2}", "--schedule", "onecycle"], "unknown --schedule 'onecycle'"),
        (["train", "--data", f"sst2:{tmp_path}/none"], "no sst2 data found"),
        (["ablate", "--protocol", "cpu", "--data", f"sst2:{sst2}"], "use --protocol sst2-"),
        (["ablate", "--protocol", "sst2-smoke", "--data", f"multi30k:{m30k}"], "is for sst2 data"),
        (["ablate", "--protocol", "sst2-smoke", "--data", f"sst2:{sst2}", "--epochs", "auto"], "needs --time-budget"),
        (["train", "--data", f"sst2:{sst2}", "--depth", "20"], "use --layers"),
        (["train", "--data", f"sst2:{sst2}", "--momentum", "0.8"], "text models train with AdamW"),
        (["train", "--data", f"imagefolder:{tmp_path}", "--width", "64"], "--width apply to text models"),
    ]
    for argv, message in cases:
        assert main([*argv, "--out", str(tmp_path / "o")]) == 2, argv
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (argv, err)


def test_arms_of_each_model():
    """Every role gets its only:<role> arm, unless that is an earlier arm's policy for the model:
    pre-LN (residual_last and head γ) only:residual_last is guidelines; in the post-LN translator
    guidelines decays only the one residual_last γ (the memory's norm)."""
    said = []
    assert default_arms("textcls_preln", log=said.append) == ("no_gamma", "guidelines", "all", "only:head")
    assert said == ["only:residual_last left out: for textcls_preln it is the same policy as guidelines"]
    assert default_arms("textcls_postln") == ("no_gamma", "guidelines", "all", "only:stream", "only:head")
    assert default_arms("seq2seq_postln") == ("no_gamma", "guidelines", "all", "only:stream", "only:head")
    assert default_arms("seq2seq_preln") == ("no_gamma", "guidelines", "all", "only:head")


def test_same_seed_same_run_and_arms_start_alike(sst2):
    data = load_data(_cfg(sst2))
    a = TextTrainer(_cfg(sst2, policy="all"), data, CPU, progress=False)
    b = TextTrainer(_cfg(sst2, policy="no_gamma"), data, CPU, progress=False)
    for (n, p), (_, q) in zip(a.model.named_parameters(), b.model.named_parameters(), strict=True):
        assert torch.equal(p, q), n  # paired: the same initial weights
    ra = a.run()
    rb = TextTrainer(_cfg(sst2, policy="all"), data, CPU, progress=False).run()
    assert ra.test_acc == rb.test_acc and ra.history[-1]["train_loss"] == rb.history[-1]["train_loss"]


def test_an_interrupted_run_resumes_to_the_same_result(sst2, tmp_path):
    data = load_data(_cfg(sst2))
    whole = TextTrainer(_cfg(sst2), data, CPU, progress=False).run()
    ckpt = tmp_path / "ck" / "run.pt"
    first = TextTrainer(_cfg(sst2), data, CPU, checkpoint=ckpt, progress=False)
    loss, acc, tok_s = first.train_epoch(0)  # one epoch, then "killed"
    first.history.append(first.measure(0, loss, acc, tok_s))
    first._save(1)
    again = TextTrainer(_cfg(sst2), data, CPU, checkpoint=ckpt, progress=False)
    assert again.start_epoch == 1
    record = again.run()
    assert record.test_acc == whole.test_acc
    assert record.history[-1]["train_loss"] == pytest.approx(whole.history[-1]["train_loss"], rel=1e-6)


def test_length_batches_cover_the_epoch_and_are_paired():
    lengths = torch.randint(1, 40, (1000,), generator=torch.Generator().manual_seed(0))
    batches = length_batches(lengths, 64, seed=3, epoch=1, pool=4)
    assert len(batches) == 1000 // 64 and all(len(b) == 64 for b in batches)
    flat = torch.cat(batches)
    assert len(set(flat.tolist())) == len(flat)  # no sentence twice in an epoch
    again = length_batches(lengths, 64, seed=3, epoch=1, pool=4)
    assert all(torch.equal(x, y) for x, y in zip(batches, again, strict=True))
    assert not torch.equal(torch.cat(length_batches(lengths, 64, seed=3, epoch=2, pool=4)), flat)
    # within a batch, lengths are close: far less padding than a random batch would have
    spread = torch.tensor([float(lengths[b].max() - lengths[b].min()) for b in batches]).mean()
    assert spread < 15


def test_warmup_then_decay():
    f = [text_lr_factor(s, 100, "linear", 10) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0) and f[10] == pytest.approx(1.0)
    assert f[55] == pytest.approx(0.5) and f[-1] == pytest.approx(1 / 90)
    assert all(a >= b for a, b in zip(f[10:], f[11:], strict=False))
    c = [text_lr_factor(s, 100, "cosine", 10) for s in range(100)]
    assert c[9] == pytest.approx(1.0) and c[55] == pytest.approx(0.5) and c[-1] < 0.01


def test_text_protocols_are_text_configs():
    for name in ("sst2-smoke", "sst2-cpu", "multi30k-smoke", "multi30k-gpu"):
        cfg = ablate.PROTOCOLS[name].config
        assert isinstance(cfg, TextConfig) and cfg.task == ("translate" if "multi30k" in name else "classify")
    assert T.text_task("sst2:/x") == "classify" and T.text_task("imagefolder:/x") is None
    assert json.dumps(ablate.PROTOCOLS["sst2-cpu"].config.settings())  # recordable


def test_epochs_auto_sizes_a_text_grid_to_its_budget(m30k, tmp_path, capsys):
    out = tmp_path / "auto"
    argv = ["ablate", "--protocol", "multi30k-smoke", "--data", f"multi30k:{m30k}", "--arms", "no_gamma",
            "--vocab-size", "120", "--test-subset", "24", "--epochs", "auto", "--time-budget", "30", "--device", "cpu",
            "--out", str(out)]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "probe: 1 processes train" in err and "epochs fit in" in err
    (r,) = _lines(out)
    fit = int(err.split(" epochs fit in")[0].rsplit("-> ", 1)[1])
    assert r["epochs"] == fit >= 1 and r["status"] == "ok"


def test_shards_and_worker_processes_run_a_text_grid(sst2, tmp_path):
    out = tmp_path / "sharded"
    base = ["ablate", "--protocol", "sst2-smoke", "--data", f"sst2:{sst2}", "--arms", "no_gamma,all",
            "--seeds", "0,1", "--vocab-size", "120", "--test-subset", "64", "--no-report", "--out", str(out)]
    assert main([*base, "--shard", "1/2"]) == 0
    assert sorted((r["arm"], r["seed"]) for r in _lines(out)) == [("all", 0), ("all", 1)]  # every 2nd run
    assert main([*base, "--jobs", "2"]) == 0  # the rest, in two worker processes
    recs = _lines(out)
    assert sorted((r["arm"], r["seed"]) for r in recs) == [("all", 0), ("all", 1), ("no_gamma", 0), ("no_gamma", 1)]
    assert all(r["status"] == "ok" and r["metric"] == "test_acc" for r in recs)
