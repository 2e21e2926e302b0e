"""Models compiled, exported or quantized: analyzed with the eager model's roles, or one clear error.

A TorchScript module (scripted or traced) and the module of a ``torch.export`` program run the same
aten ops as the eager model, so the trace sees the same dataflow; their normalizations are found as
norm ops with their weights, and each γ gets the eager model's role. Neither can be switched to
train mode or have its eps changed, so ``verify`` refuses them in one line. An eager-mode int8 model
(static quantization) holds its weights as packed integers that no optimizer trains: analyzing it
is refused with a line saying to pass the float model; dynamic quantization keeps the float
normalizations and is analyzed."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.ao.quantization as tq
from torch import nn

import gammaguide as gg
from gammaguide.models import create_model

X = torch.randn(2, 3, 8, 8)


@pytest.fixture(scope="module")
def eager():
    model = create_model("resnet20").eval()
    return model, {e.param_name: e.role for e in gg.analyze(model, X).entries}


def _script(m):
    return torch.jit.script(m)


def _jit_trace(m):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.trace(m, X)


def _export(m):
    return torch.export.export(m, (X,)).module()


@pytest.mark.parametrize("make", [_script, _jit_trace, _export], ids=["script", "jit.trace", "export"])
def test_compiled_model_has_the_eager_roles(make, eager, roles):
    model, expected = eager
    compiled = make(model)
    report = gg.analyze(compiled, X)
    assert roles(report) == expected and len(expected) == 21
    assert {e.norm_type for e in report.entries} == {"functional batch_norm"}
    assert not report.warnings
    groups = gg.param_groups(compiled, 5e-4, example_inputs=X, report=report)
    assert sum(len(g["params"]) for g in groups) == len(list(compiled.parameters()))


@pytest.mark.parametrize("make", [_script, _export], ids=["script", "export"])
def test_verify_refuses_compiled_models_in_one_line(make, eager):
    with pytest.raises(gg.GammaGuideError, match="Verify the eager model it was made from"):
        gg.verify(make(eager[0]), X)


def test_an_exported_program_itself_says_what_to_pass(eager):
    with pytest.raises(gg.GammaGuideError, match=r"program.module\(\)"):
        gg.analyze(torch.export.export(eager[0], (X,)), X)


class Quantizable(nn.Module):
    def __init__(self):
        super().__init__()
        self.quant, self.dequant = tq.QuantStub(), tq.DeQuantStub()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3),
                                  nn.BatchNorm2d(8))
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.dequant(self.body(self.quant(x))).mean((2, 3)))


def test_int8_model_is_refused_with_what_to_pass():
    model = Quantizable().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.qconfig = tq.get_default_qconfig("fbgemm")
        prepared = tq.prepare(model)
        prepared(X)
        int8 = tq.convert(prepared)
    with pytest.raises(gg.GammaGuideError, match="quantized model .*Analyze the float model before quantizing"):
        gg.analyze(int8, X)
    with pytest.raises(gg.GammaGuideError, match="quantized model"):
        gg.param_groups(int8, 5e-4, example_inputs=X)


def test_dynamic_quantization_keeps_float_norms(roles):
    model = Quantizable().eval()
    expected = roles(gg.analyze(model, X))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dynamic = tq.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    assert roles(gg.analyze(dynamic, X)) == expected == {"body.1.weight": "scale_invariant", "body.4.weight": "head"}
