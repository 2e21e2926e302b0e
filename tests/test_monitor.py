"""gg.Monitor in a plain training loop: what it records, that it never changes training, its
warnings, sinks, JSONL and the `gammaguide monitor` plots."""

from __future__ import annotations

import json
import logging
import math
import random
import re
import sys
import types
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import gammaguide as gg
from gammaguide import cli
from gammaguide.models import create_model
from gammaguide.monitor import MonitorWarning, Record, read_jsonl, variance_ratios

X = (4, 3, 16, 16)  # small images: the ResNet-20 pools adaptively


def data(steps: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(*X, generator=g), torch.randint(0, 10, (X[0],), generator=g)) for _ in range(steps)]


def setup(policy: str = "guidelines", lr: float = 0.1, wd: float = 5e-3, model=None):
    torch.manual_seed(0)
    model = create_model("resnet20") if model is None else model
    x = torch.randn(*X, generator=torch.Generator().manual_seed(2))
    opt = torch.optim.SGD(gg.param_groups(model, wd, x[:2], policy=policy), lr=lr, momentum=0.9)
    return model, opt, x


def train(model, opt, batches, sched=None, autocast: bool = False, net=None) -> None:
    net = model if net is None else net
    for xb, yb in batches:
        model.train()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = F.cross_entropy(net(xb), yb) + 0 * F.dropout(xb, 0.5).sum()  # the step draws random numbers
        opt.zero_grad()
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()


def state(model, opt) -> dict[str, torch.Tensor]:
    out = {f"p:{n}": p.detach().clone() for n, p in model.named_parameters()}
    out.update({f"b:{n}": b.clone() for n, b in model.named_buffers()})
    for i, s in enumerate(opt.state.values()):
        out.update({f"s{i}:{k}": v.clone() for k, v in s.items() if isinstance(v, torch.Tensor)})
    out["rng"] = torch.get_rng_state()
    return out


def assert_bit_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


# -- never changes training -------------------------------------------------------------------------


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_training_is_bit_identical_with_and_without_the_monitor(autocast):
    batches = data(5)
    results = []
    for monitored in (False, True):
        model, opt, x = setup()
        sched = torch.optim.lr_scheduler.StepLR(opt, 2, 0.5)
        random.seed(3)
        mon = gg.Monitor(model, opt, x, every=1, probe_every=1, warn=False) if monitored else None
        train(model, opt, batches, sched, autocast)
        if mon is not None:
            assert len(mon.history) == 6 and all(r.variance for r in mon.history)
            mon.close()
        results.append(state(model, opt) | {"py": torch.tensor(random.random())})
    assert_bit_identical(*results)


def test_compiled_model_trains_bit_identically_and_is_recorded():
    batches = data(3)
    results = []
    for monitored in (False, True):
        model, opt, x = setup()
        net = torch.compile(model, backend="eager")
        mon = gg.Monitor(net, opt, x, every=1, probe_every=2, warn=False) if monitored else None
        train(model, opt, batches, net=net)
        if mon is not None:
            assert [r.step for r in mon.history] == [0, 1, 2, 3]
            assert set(mon.history[-1].roles) == {"residual_last", "scale_invariant", "shortcut", "stream"}
            assert mon.history[2].variance and not mon.history[1].variance
            mon.close()
        results.append(state(model, opt))
    assert_bit_identical(*results)


def test_the_probe_puts_back_mode_batchnorm_statistics_and_every_rng():
    model, _, x = setup()
    model.train()
    import numpy as np

    before = state(model, torch.optim.SGD(model.parameters(), lr=0))
    py, npy = random.getstate(), np.random.get_state()[1].copy()
    ratios = variance_ratios(model, x)
    assert len(ratios) == 9 and all(math.isfinite(v) and v > 0 for v in ratios.values())
    assert model.training and all(m.training for m in model.modules())
    assert_bit_identical(before, state(model, torch.optim.SGD(model.parameters(), lr=0)))
    assert random.getstate() == py and (np.random.get_state()[1] == npy).all()


# -- what it records -----------------------------------------------------------------------------------


def test_records_follow_every_and_probe_every_and_hold_the_documented_fields():
    model, opt, x = setup()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))  # the lr changes every step
    lrs = []
    with gg.Monitor(model, opt, x, every=2, probe_every=3) as mon:
        for xb, yb in data(6):
            F.cross_entropy(model(xb), yb).backward()
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            opt.zero_grad()
            sched.step()
    assert [r.step for r in mon.history] == [0, 2, 3, 4, 6]
    assert [bool(r.variance) for r in mon.history] == [True, False, True, False, True]
    assert mon.step == 6
    d = mon.history[-1].to_dict()
    assert set(d) == {"step", "roles", "weights", "variance", "groups", "warnings"}
    assert set(d["roles"]["residual_last"]) == {"count", "gamma_abs", "gamma_norm", "eff_lr", "decayed",
                                                "decay_time"}
    assert set(d["variance"]) == {f"layers.{i}.{j}" for i in range(3) for j in range(3)}
    assert json.loads(json.dumps(d)) == d

    # By hand: eff_lr of a role at the lr of that step, and the decay time Σ lr_t·λ.
    names = {e.param_name for e in mon.report.entries if e.role == "scale_invariant"}
    gammas = [p for n, p in model.named_parameters() if n in names]
    lr_now = lrs[-1]  # the lr of the step just taken (the scheduler moves it on after the hook)
    want = sum(lr_now / float(g.detach().pow(2).sum()) for g in gammas) / len(gammas)
    si = mon.history[-1].roles["scale_invariant"]
    assert si.count == 9 and si.decayed == 9
    assert si.eff_lr == pytest.approx(want, rel=1e-6)
    assert si.gamma_abs == pytest.approx(float(torch.cat([g.detach().abs() for g in gammas]).mean()), rel=1e-6)
    assert si.gamma_norm == pytest.approx(sum(float(g.detach().norm()) for g in gammas) / 9, rel=1e-6)
    decay = next(g for g in mon.history[-1].groups.values() if g.weight_decay > 0)
    assert decay.decay_time == pytest.approx(sum(lrs) * 5e-3, rel=1e-9)
    assert si.decay_time == pytest.approx(decay.decay_time)
    stream = mon.history[-1].roles["stream"]
    assert stream.decayed == 0 and stream.decay_time == 0  # guidelines: the stream γ is not decayed
    # The scale-invariant weights: every conv (each is followed by a BN), not the classifier.
    assert mon.history[-1].weights.count == 21 and mon.history[-1].weights.decayed == 21


def test_a_report_may_replace_the_example_inputs():
    model, opt, x = setup()
    report = gg.analyze(model, x, warn=False)
    a = gg.Monitor(model, opt, x, warn=False).history[0]
    b = gg.Monitor(model, opt, report=report, probe=x, warn=False).history[0]
    assert a.to_dict() == b.to_dict()
    with pytest.warns(MonitorWarning, match="no variance ratios"):
        c = gg.Monitor(model, opt, report=report)  # an image model: traced with its default input
    assert c.history[0].variance == {} and c.history[0].weights.count == 21


def test_close_detaches_and_record_can_be_called_by_hand():
    model, opt, x = setup()
    mon = gg.Monitor(model, opt, x, every=1, probe_every=0)
    train(model, opt, data(2))
    mon.close()
    train(model, opt, data(2))
    assert mon.step == 2 and [r.step for r in mon.history] == [0, 1, 2]
    assert all(not r.variance for r in mon.history)
    assert mon.record(probe=True).variance


def test_bad_options_are_one_clear_error():
    model, opt, x = setup()
    with pytest.raises(gg.GammaGuideError, match="every must be a whole number >= 1"):
        gg.Monitor(model, opt, x, every=0)
    with pytest.raises(gg.GammaGuideError, match="torch.optim.Optimizer"):
        gg.Monitor(model, object(), x)
    with pytest.raises(gg.GammaGuideError, match="late must be"):
        gg.Monitor(model, opt, x, late=2)
    with pytest.raises(gg.GammaGuideError, match="cannot send records"):
        gg.Monitor(model, opt, x, sinks=[42])


# -- warnings -----------------------------------------------------------------------------------------


def test_decayed_stream_and_shortcut_gammas_are_named_once():
    model, opt, x = setup(policy="all")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with gg.Monitor(model, opt, x, every=1, probe_every=0) as mon:
            train(model, opt, data(3))
    found = [str(w.message) for w in caught if issubclass(w.category, MonitorWarning)]
    assert len(found) == 2, found
    assert "1 stream γ" in found[0] and "bn1.weight" in found[0]
    assert "2 shortcut γ" in found[1] and "layers.1.0.shortcut.1.weight" in found[1]
    assert mon.history[0].warnings == tuple(found) and mon.warnings == found
    model, opt, x = setup(policy="guidelines")
    with warnings.catch_warnings():
        warnings.simplefilter("error", MonitorWarning)
        gg.Monitor(model, opt, x, every=1).close()


def test_effective_lr_moving_100_fold_at_a_fixed_lr_warns_but_a_schedule_does_not():
    model, opt, x = setup(lr=0.0)
    mon = gg.Monitor(model, opt, x, every=1, probe_every=0, warn=False)
    for g in opt.param_groups:
        g["lr"] = 1e-6  # a schedule's own change: no warning
    opt.step()
    assert mon.warnings == []
    with torch.no_grad():
        for p in mon._weights:
            p.mul_(11)  # ‖W‖² up 121-fold: eff_lr down at the same lr
    opt.step()
    assert len(mon.warnings) == 1 and "fallen 121-fold" in mon.warnings[0] and "too weak" in mon.warnings[0]
    opt.step()
    assert len(mon.warnings) == 1  # once


def test_a_branch_that_outgrows_its_skip_late_in_training_is_named_with_its_gamma_last():
    model, opt, x = setup(lr=0.0)
    mon = gg.Monitor(model, opt, x, every=1, probe_every=1, total_steps=4, late=0.5, warn=False)
    with torch.no_grad():
        model.layers[2].get_submodule("1").bn2.weight.mul_(30)
    opt.step()  # step 1: not late yet
    assert mon.warnings == []
    opt.step()  # step 2 of 4: late
    assert len(mon.warnings) == 1
    w = mon.warnings[0]
    assert "residual sum 'layers.2.1'" in w and "layers.2.1.bn2.weight" in w and "decays layers.2.1.bn2" in w
    # Without total_steps the last probe is checked when the monitor closes.
    model, opt, x = setup(lr=0.0)
    mon = gg.Monitor(model, opt, x, every=1, probe_every=1, warn=False)
    with torch.no_grad():
        model.layers[2].get_submodule("2").bn2.weight.mul_(30)  # the last block: no sum after it moves
    opt.step()
    assert mon.warnings == []
    mon.close()
    assert len(mon.warnings) == 1 and "'layers.2.2'" in mon.warnings[0]


# -- sinks, JSONL, plots ---------------------------------------------------------------------------------


class FakeWriter:
    def __init__(self):
        self.scalars, self.flushed = [], 0

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))

    def add_text(self, tag, text, step):
        pass

    def flush(self):
        self.flushed += 1


def test_sinks_get_every_record(tmp_path, caplog):
    model, opt, x = setup()
    writer, seen = FakeWriter(), []
    wandb = types.SimpleNamespace(logged=[])
    wandb.log = wandb.logged.append  # a stand-in for the wandb module: no wandb needed
    logger = logging.getLogger("test_monitor")
    with caplog.at_level(logging.INFO, logger="test_monitor"):
        with gg.Monitor(model, opt, x, every=1, probe_every=2,
                        sinks=[writer, wandb, logger, seen.append, tmp_path / "live.jsonl"]) as mon:
            train(model, opt, data(2))
    assert [r.step for r in seen] == [0, 1, 2] and seen == mon.history
    assert ("gammaguide/gamma_abs/residual_last", mon.history[1].roles["residual_last"].gamma_abs, 1) in writer.scalars
    assert ("gammaguide/variance/layers.0.0", mon.history[2].variance["layers.0.0"], 2) in writer.scalars
    assert writer.flushed == 1
    assert [d["gammaguide/step"] for d in wandb.logged] == [0, 1, 2]
    assert "gammaguide/eff_lr/scale_invariant" in wandb.logged[0]
    assert sum("gammaguide step" in r.message for r in caplog.records) == 3
    assert read_jsonl(tmp_path / "live.jsonl") == mon.history


def test_wandb_is_optional(monkeypatch):
    from gammaguide.monitor import WandbSink

    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed
    with pytest.raises(gg.GammaGuideError, match="pip install wandb"):
        WandbSink()


def test_tensorboard_summary_writer(tmp_path):
    pytest.importorskip("tensorboard")
    from torch.utils.tensorboard import SummaryWriter

    model, opt, x = setup()
    writer = SummaryWriter(tmp_path / "tb")
    with gg.Monitor(model, opt, x, every=1, sinks=[writer]):
        train(model, opt, data(1))
    writer.close()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("gammaguide/gamma_abs/residual_last")] == [0, 1]


def test_jsonl_round_trip_and_the_plot_command(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    runs = {}
    for policy in ("guidelines", "all"):
        model, opt, x = setup(policy=policy)
        with gg.Monitor(model, opt, x, every=1, probe_every=2, warn=False) as mon:
            train(model, opt, data(2))
        runs[policy] = mon.to_jsonl(tmp_path / f"{policy}.jsonl")
        assert read_jsonl(runs[policy]) == mon.history
        assert Record.from_dict(mon.history[-1].to_dict()) == mon.history[-1]
    assert cli.main(["monitor", str(runs["guidelines"]), str(runs["all"]), "--out", str(tmp_path / "png")]) == 0
    out = capsys.readouterr().out
    for name in ("monitor_gamma.png", "monitor_effective_lr.png", "monitor_variance.png"):
        assert (tmp_path / "png" / name).stat().st_size > 1000 and name in out
    (tmp_path / "bad.jsonl").write_text("{}\n")
    assert cli.main(["monitor", str(tmp_path / "bad.jsonl"), "--out", str(tmp_path)]) == 2
    assert "is not a monitor record" in capsys.readouterr().err


def test_a_model_without_scale_invariant_weights_has_none():
    class Pre(nn.Module):  # a pre-LN block: no weight is normalized next
        def __init__(self):
            super().__init__()
            self.norm, self.fc, self.head = nn.LayerNorm(8), nn.Linear(8, 8), nn.Linear(8, 2)

        def forward(self, x):
            return self.head(x + self.fc(self.norm(x)))

    model = Pre()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with gg.Monitor(model, opt, torch.randn(4, 8), every=1) as mon:
        model(torch.randn(4, 8)).sum().backward()
        opt.step()
    rec = mon.history[-1]
    assert rec.weights is None and set(rec.roles) == {"residual_last"} and list(mon.history[0].variance) == ["<model>"]


def test_the_python_blocks_of_docs_monitor_md_run(tmp_path, monkeypatch):
    doc = Path(__file__).resolve().parents[1] / "docs" / "monitor.md"
    blocks = re.findall(r"```python\n(.*?)```", doc.read_text(), flags=re.S)
    assert blocks
    monkeypatch.chdir(tmp_path)
    for code in blocks:
        exec(compile(code, str(doc), "exec"), {"__name__": "__doc_snippet__"})
    assert read_jsonl(tmp_path / "runs" / "monitor.jsonl")[0].step == 0
