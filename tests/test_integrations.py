"""timm, Hugging Face Trainer and Lightning use the guideline groups; the examples run."""

from __future__ import annotations

import sys

import pytest
import torch
from example_helpers import load_example
from torch import nn

import gammaguide as gg
from gammaguide.models import create_model


def decay_by_name(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, bool]:
    """Parameter name -> does the optimizer decay it; fails if a parameter is in two groups."""
    names = {id(p): n for n, p in model.named_parameters()}
    out: dict[str, bool] = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            assert names[id(p)] not in out
            out[names[id(p)]] = group["weight_decay"] > 0
    return out


# -- timm -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def timm_resnet():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=10)
    return model, gg.analyze(model, torch.randn(1, 3, 32, 32))


@pytest.mark.parametrize(
    ("opt", "cls_name", "options"),
    [
        ("sgd", "SGD", {"nesterov": True, "momentum": 0.9}),
        ("momentum", "SGD", {"nesterov": False, "momentum": 0.9}),
        ("nesterov", "SGD", {"nesterov": True}),
        ("adamw", "AdamW", {"betas": (0.9, 0.999)}),
        ("lamb", "Lamb", {}),
        ("lion", "Lion", {}),
        ("lookahead_adamw", "Lookahead", {}),
    ],
)
def test_timm_create_optimizer_uses_guideline_groups(timm_resnet, opt, cls_name, options):
    from timm.optim import create_optimizer_v2

    model, report = timm_resnet
    optimizer = gg.create_optimizer(model, opt, lr=0.01, weight_decay=0.05, report=report)
    assert type(optimizer).__name__ == cls_name
    assert type(optimizer) is type(create_optimizer_v2(model, opt, lr=0.01, weight_decay=0.05))
    assert decay_by_name(model, optimizer) == report.decisions()
    for group in optimizer.param_groups:
        assert group["lr"] == 0.01 and group["weight_decay"] in (0.0, 0.05)
        assert all(group[k] == v for k, v in options.items())
    # timm itself would decay no γ at all; the guidelines decay residual_last and scale_invariant ones
    decayed = decay_by_name(model, optimizer)
    assert decayed["layer1.0.bn2.weight"] and decayed["layer1.0.bn1.weight"] and not decayed["bn1.weight"]


def test_timm_create_optimizer_traces_and_steps(timm_resnet):
    model, report = timm_resnet
    optimizer = gg.create_optimizer(model, "adamw", lr=0.01, weight_decay=0.05,
                                    example_inputs=torch.randn(1, 3, 32, 32), lr_scale={"stream": 0.5})
    stem = [g for g in optimizer.param_groups if any(p is model.bn1.weight for p in g["params"])][0]
    assert stem["lr_scale"] == 0.5 and stem["lr"] == 0.005  # timm's schedulers honour lr_scale
    before = model.bn1.weight.detach().clone()
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    optimizer.step()
    optimizer.zero_grad()
    assert not torch.equal(before, model.bn1.weight)


def test_create_optimizer_without_timm_falls_back_to_torch(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # makes "import timm" raise ImportError
    monkeypatch.setitem(sys.modules, "timm.optim", None)
    model = create_model("resnet20")
    sgd = gg.create_optimizer(model, "sgd", lr=0.1, weight_decay=5e-4)
    assert type(sgd) is torch.optim.SGD
    assert sgd.param_groups[0]["nesterov"] and sgd.param_groups[0]["momentum"] == 0.9  # timm's defaults
    assert not gg.create_optimizer(model, "momentum", lr=0.1).param_groups[0]["nesterov"]
    assert type(gg.create_optimizer(model, "adamw", lr=1e-3, weight_decay=0.05)) is torch.optim.AdamW
    with pytest.raises(gg.GammaGuideError, match="'lamb' needs timm"):
        gg.create_optimizer(model, "lamb")


def test_create_optimizer_rejects_what_it_cannot_honour(timm_resnet):
    model, report = timm_resnet
    with pytest.raises(gg.GammaGuideError, match="layer_decay would be ignored"):
        gg.create_optimizer(model, "adamw", layer_decay=0.75, report=report)
    with pytest.raises(gg.GammaGuideError, match="no optimizer 'adamx'"):
        gg.create_optimizer(model, "adamx", report=report)
    with pytest.raises(gg.GammaGuideError, match="weight_decay must be a finite number >= 0, got -1.0"):
        gg.create_optimizer(model, "sgd", weight_decay=-1.0, report=report)


def test_timm_example_runs(capsys):
    pytest.importorskip("timm")
    load_example("timm_optimizer").main()
    out = capsys.readouterr().out
    assert "lion: Lion" in out and "one AdamW step done" in out


# -- Hugging Face Trainer -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf():
    """transformers, whose Trainer and TrainingArguments need accelerate too."""
    pytest.importorskip("accelerate")
    return pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def trained_bert(hf, tmp_path_factory):
    trainer = load_example("hf_trainer_bert").build_trainer(str(tmp_path_factory.mktemp("hf")), max_steps=3)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    return trainer, before


def test_trainer_optimizer_has_the_guideline_groups(trained_bert):
    trainer, _ = trained_bert
    decays = decay_by_name(trainer.model, trainer.optimizer)
    assert decays == trainer.gg_report.decisions()
    layer_norms = [n for n in decays if "LayerNorm.weight" in n]
    assert len(layer_norms) == 5 and not any(decays[n] for n in layer_norms)
    assert {e.role for e in trainer.gg_report.entries} == {"stream", "head"}  # post-LN BERT
    for name in ("bert.encoder.layer.0.attention.self.query.weight", "bert.encoder.layer.1.output.dense.weight",
                 "bert.encoder.layer.0.intermediate.dense.weight", "classifier.weight"):
        assert decays[name], name
    assert not decays["bert.encoder.layer.0.attention.self.query.bias"]
    assert {g["weight_decay"] for g in trainer.optimizer.param_groups} == {0.0, 0.01}


def test_trainer_really_trained(trained_bert):
    trainer, before = trained_bert
    assert trainer.state.global_step == 3
    assert sum("loss" in h for h in trainer.state.log_history) == 3
    changed = [n for n, p in trainer.model.named_parameters() if not torch.equal(p, before[n])]
    assert "bert.embeddings.LayerNorm.weight" in changed and "classifier.weight" in changed


def test_hf_optimizers_pair_follows_training_arguments(hf, tmp_path):
    model = load_example("hf_trainer_bert").build_trainer(str(tmp_path), max_steps=1).model
    args = hf.TrainingArguments(output_dir=str(tmp_path), optim="adamw_torch", learning_rate=2e-5,
                                          weight_decay=0.01, warmup_steps=2, lr_scheduler_type="cosine",
                                          report_to="none", use_cpu=True)
    ids = torch.randint(0, 100, (1, 16))
    optimizer, scheduler = gg.hf_optimizers(model, args, num_training_steps=10, example_inputs={"input_ids": ids})
    assert type(optimizer) is torch.optim.AdamW
    report = gg.analyze(model, {"input_ids": ids})
    assert decay_by_name(model, optimizer) == report.decisions()
    assert scheduler.get_last_lr()[0] == 0.0  # warm-up starts at zero
    optimizer.step()
    scheduler.step()
    assert 0 < scheduler.get_last_lr()[0] < 2e-5


def test_trainer_without_a_usable_first_example_says_what_to_pass(hf, tmp_path):
    trainer = load_example("hf_trainer_bert").build_trainer(str(tmp_path), max_steps=1)
    trainer.train_dataset = [{"text": "not tokenized"}]
    with pytest.raises(gg.GammaGuideError, match="holds none of the inputs .*pass example_inputs="):
        trainer.create_optimizer()
    trainer.train_dataset = [{"input_ids": [1, None]}]
    with pytest.raises(gg.GammaGuideError, match="could not build an example batch .*pass example_inputs="):
        trainer.create_optimizer()


# -- Lightning ------------------------------------------------------------------------------------


def test_lightning_configure_optimizers(tmp_path):
    pytest.importorskip("lightning")
    example = load_example("lightning_resnet")
    module = example.Classifier()
    before = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    example.make_trainer(str(tmp_path), max_steps=2).fit(module, example.random_images(32))
    optimizer = module.trainer.optimizers[0]
    report = gg.analyze(module.model, torch.zeros(1, 3, 32, 32))
    assert decay_by_name(module.model, optimizer) == report.decisions()
    assert module.trainer.global_step == 2
    assert not torch.equal(before["layers.0.0.bn2.weight"], module.model.layers[0][0].bn2.weight)
