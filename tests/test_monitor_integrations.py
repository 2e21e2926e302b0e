"""gg.Monitor from one added line: the Hugging Face Trainer callback, the Lightning callback and
the plain-loop example; each records per role, and the Trainer trains bit for bit as without it."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from example_helpers import load_example

from gammaguide.monitor import read_jsonl


def test_hf_trainer_callback_records_and_changes_nothing(tmp_path):
    pytest.importorskip("accelerate")
    pytest.importorskip("transformers")
    from gammaguide.hf import MonitorCallback

    example = load_example("hf_trainer_bert")
    params = []
    for monitor in (False, True):
        trainer = example.build_trainer(str(tmp_path / str(monitor)), max_steps=4, monitor=monitor, every=2)
        trainer.train()
        params.append({n: p.detach().clone() for n, p in trainer.model.named_parameters()})
    for n in params[0]:
        assert torch.equal(params[0][n], params[1][n]), n
    callback = next(c for c in trainer.callback_handler.callbacks if isinstance(c, MonitorCallback))
    mon = callback.monitor
    assert [r.step for r in mon.history] == [0, 2, 4]
    assert set(mon.history[-1].roles) == {"stream", "head"}  # post-LN BERT
    assert mon.history[-1].weights is None  # no weight of BERT is normalized next
    assert mon.history[-1].variance and mon.history[0].variance and not mon.history[1].variance
    assert mon.total_steps == 4 and mon._handle is not None
    assert read_jsonl(tmp_path / "True" / "gammaguide-monitor.jsonl") == mon.history
    # AdamW's groups from the Trainer: the LayerNorm γ are not decayed, no warning about them.
    assert mon.history[-1].roles["stream"].decayed == 0 and mon.warnings == []


def test_lightning_callback_records_and_logs(tmp_path):
    pytest.importorskip("lightning")
    from gammaguide.lightning import MonitorCallback

    example = load_example("lightning_resnet")
    from lightning.pytorch.loggers import CSVLogger

    module = example.Classifier()
    trainer = example.make_trainer(str(tmp_path), max_steps=4, every=2, logger=CSVLogger(tmp_path / "logs"))
    trainer.fit(module, example.random_images(64))
    callback = next(c for c in trainer.callbacks if isinstance(c, MonitorCallback))
    mon = callback.monitor
    assert [r.step for r in mon.history] == [0, 2, 4] and mon.total_steps == 4
    assert set(mon.history[-1].roles) == {"residual_last", "scale_invariant", "shortcut", "stream"}
    assert mon.history[-1].roles["stream"].decayed == 0 and mon.history[-1].weights.count == 21
    names = [e.param_name for e in mon.report.entries]
    assert "model.bn1.weight" in names  # the LightningModule is what is monitored
    rows = list(csv.DictReader(open(next((tmp_path / "logs").rglob("metrics.csv")))))
    ours = [float(r["gammaguide/gamma_abs/residual_last"]) for r in rows if r.get("gammaguide/gamma_abs/residual_last")]
    assert ours == pytest.approx([r.roles["residual_last"].gamma_abs for r in mon.history])
    assert [json.dumps(r.to_dict()) for r in read_jsonl(tmp_path / "gammaguide-monitor.jsonl")] == [
        json.dumps(r.to_dict()) for r in mon.history]


def test_plain_loop_example_runs(tmp_path, capsys):
    example = load_example("monitor_loop")
    mon = example.main(steps=6, out=str(tmp_path))
    assert [r.step for r in mon.history] == [0, 2, 4, 6]
    assert (tmp_path / "monitor.jsonl").is_file()
    assert "mean |γ|" in capsys.readouterr().out
