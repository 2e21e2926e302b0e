"""Which normalizations are found, and the warnings: each case gets the right role, or exactly one
precise warning (issue 9, §5)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import gammaguide as gg

# Every test twice: analyze's default pass on meta tensors, and the real pass (conftest.py).
pytestmark = pytest.mark.usefixtures("forward_pass")

D = 8
SEQ = torch.randn(2, 5, D)
IMG = torch.randn(2, 3, 8, 8)


def quiet_analyze(model: nn.Module, x, **kw) -> gg.Report:
    """analyze, failing the test on any warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return gg.analyze(model, x, **kw)


def roles(report: gg.Report) -> dict[str, str]:
    return {e.param_name: e.role for e in report.entries}


def kinds(report: gg.Report) -> dict[str, str]:
    return {p.name: p.kind for p in report.params}


# ----------------------------------------------------------------------------- missed silently before


class RmsBlock(nn.Module):
    """A pre-norm block calling ``F.rms_norm`` (the trace sees its decomposition)."""

    def __init__(self):
        super().__init__()
        self.w, self.fc = nn.Parameter(torch.ones(D)), nn.Linear(D, D)

    def forward(self, x):
        return x + self.fc(F.rms_norm(x, (D,), self.w, 1e-6))


class LayerNormBlock(nn.Module):
    """A LayerNorm written out inside a block, with a β."""

    def __init__(self):
        super().__init__()
        self.g, self.b, self.fc = nn.Parameter(torch.ones(D)), nn.Parameter(torch.zeros(D)), nn.Linear(D, D)

    def forward(self, x):
        h = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, keepdim=True, unbiased=False) + 1e-5)
        return x + self.fc(h * self.g + self.b)


@pytest.mark.parametrize("block, gamma, beta", [(RmsBlock, "w", None), (LayerNormBlock, "g", "b")])
def test_a_normalization_written_inline_in_a_block(block, gamma, beta):
    report = quiet_analyze(nn.Sequential(block(), block(), nn.Linear(D, 2)), SEQ)
    assert roles(report) == {f"0.{gamma}": "residual_last", f"1.{gamma}": "residual_last"}
    assert {e.norm_type for e in report.entries} == {"inline normalization"}
    if beta:
        assert kinds(report)[f"0.{beta}"] == "beta"


def test_an_inline_normalization_feeding_a_norm_is_scale_invariant():
    class TwoNorms(nn.Module):
        def __init__(self):
            super().__init__()
            self.w, self.ln, self.fc = nn.Parameter(torch.ones(D)), nn.LayerNorm(D), nn.Linear(D, 2)

        def forward(self, x):
            return self.fc(self.ln(torch.relu(F.rms_norm(x, (D,), self.w))))

    assert roles(quiet_analyze(TwoNorms(), SEQ)) == {"w": "scale_invariant", "ln.weight": "head"}


class PyBatchNorm(nn.Module):
    """A BatchNorm written in Python: batch statistics in training mode, running ones in eval
    mode (where, to the eval-mode trace, they are constants), folded into one scale and shift."""

    def __init__(self, c):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.ones(c)), nn.Parameter(torch.zeros(c))
        self.register_buffer("running_mean", torch.zeros(c))
        self.register_buffer("running_var", torch.ones(c))

    def forward(self, x):
        if self.training:
            mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)
            with torch.no_grad():
                self.running_mean.mul_(0.9).add_(0.1 * mean)
                self.running_var.mul_(0.9).add_(0.1 * var)
        else:
            mean, var = self.running_mean, self.running_var
        scale = self.weight / torch.sqrt(var + 1e-5)
        return x * scale[None, :, None, None] + (self.bias - mean * scale)[None, :, None, None]


class Masked(nn.Module):
    """Parameters and a buffer, no normalization in either mode."""

    def __init__(self, c):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(c))
        self.register_buffer("mask", torch.ones(c))

    def forward(self, x):
        return x * (self.scale * self.mask)[None, :, None, None]


def basic_net(norm) -> nn.Module:
    """A stem conv + norm, then one residual block with two conv + norm."""

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.n1 = nn.Conv2d(4, 4, 3, padding=1, bias=False), norm(4)
            self.c2, self.n2 = nn.Conv2d(4, 4, 3, padding=1, bias=False), norm(4)

        def forward(self, x):
            return x + self.n2(self.c2(torch.relu(self.n1(self.c1(x)))))

    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), norm(4), Block())


def test_a_python_batchnorm_using_batch_statistics_in_training_mode():
    model = basic_net(PyBatchNorm).train()
    stats = {n: b.clone() for n, b in model.named_buffers()}
    report = quiet_analyze(model, IMG)
    assert roles(report) == {"1.weight": "stream", "2.n1.weight": "scale_invariant", "2.n2.weight": "residual_last"}
    assert {e.norm_type for e in report.entries} == {"PyBatchNorm"}
    assert kinds(report)["2.n1.bias"] == "beta"
    # The training-mode look left the model as it was: modes and running statistics.
    assert all(m.training for m in model.modules())
    assert all(torch.equal(b, stats[n]) for n, b in model.named_buffers())


def test_a_module_with_parameters_and_buffers_that_does_not_normalize():
    report = quiet_analyze(basic_net(Masked), IMG)
    assert report.entries == () and kinds(report)["1.scale"] == "other"


def test_a_python_batchnorm_whose_training_mode_needs_values_is_one_warning():
    class ItemBatchNorm(PyBatchNorm):
        def forward(self, x):
            if self.training and float(x.abs().max()) > 1e9:  # needs a value: fails on meta tensors
                return x
            return super().forward(x)

    with pytest.warns(UserWarning) as record:
        report = gg.analyze(nn.Sequential(nn.Conv2d(3, 4, 3), ItemBatchNorm(4)), IMG)
    assert report.entries == () and len(record) == 1
    assert str(record[0].message).startswith("module '1' (ItemBatchNorm) scales by a statistic of its buffers in "
                                             "eval mode, like a normalization with running statistics")


class Scale(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.ones(c)), nn.Parameter(torch.zeros(c))

    def forward(self, x):
        return x * self.weight[None, :, None, None] + self.bias[None, :, None, None]


def test_a_scale_right_after_an_affine_free_batchnorm_is_its_gamma():
    model = basic_net(lambda c: nn.Sequential(nn.BatchNorm2d(c, affine=False), Scale(c)))
    report = quiet_analyze(model, IMG)
    assert roles(report) == {"1.1.weight": "stream", "2.n1.1.weight": "scale_invariant",
                             "2.n2.1.weight": "residual_last"}
    assert {e.norm_type for e in report.entries} == {"BatchNorm2d without affine, then a scale"}
    assert kinds(report)["2.n2.1.bias"] == "beta"


def test_a_scale_after_an_affine_free_layernorm_in_a_transformer_block():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln, self.g, self.fc = nn.LayerNorm(D, elementwise_affine=False), nn.Parameter(torch.ones(D)), \
                nn.Linear(D, D)

        def forward(self, x):
            return x + self.fc(self.ln(x) * self.g)

    report = quiet_analyze(nn.Sequential(Block(), Block()), SEQ)
    assert roles(report) == {"0.g": "residual_last", "1.g": "residual_last"}


# ----------------------------------------------------------------------------- false alarms before


class LayerScale(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.gamma = nn.Parameter(1e-5 * torch.ones(d))

    def forward(self, x):
        return x * self.gamma


def test_a_layer_scale_right_after_a_norm_is_no_gamma_and_no_warning():
    class Block(nn.Module):  # PoolFormer's: x + ls(pool(norm(x)) - norm(x))
        def __init__(self):
            super().__init__()
            self.norm, self.ls = nn.LayerNorm(D), LayerScale(D)

        def forward(self, x):
            n = self.norm(x)
            return x + self.ls(F.avg_pool1d(n.transpose(1, 2), 3, 1, 1).transpose(1, 2) - n)

    report = quiet_analyze(nn.Sequential(nn.Linear(D, D), Block(), Block()), SEQ)
    assert roles(report) == {"1.norm.weight": "residual_last", "2.norm.weight": "residual_last"}
    assert kinds(report)["1.ls.gamma"] == "other"


def test_a_rezero_scalar_is_no_gamma_and_no_warning():
    class ReZero(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn, self.alpha = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Parameter(
                torch.zeros(1))

        def forward(self, x):
            return x + self.alpha * self.bn(self.conv(x))

    report = quiet_analyze(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), ReZero()), IMG)
    assert roles(report) == {"1.bn.weight": "residual_last"} and kinds(report)["1.alpha"] == "other"


def test_a_scalar_after_an_affine_free_norm_is_no_gamma():
    class SkipInit(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4, affine=False)
            self.alpha = nn.Parameter(torch.zeros(()))

        def forward(self, x):
            return x + self.bn(self.conv(x)) * self.alpha

    report = quiet_analyze(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), SkipInit()), IMG)
    assert report.entries == () and kinds(report)["1.alpha"] == "other"


class NoNorm(nn.Module):
    """MobileBERT's: an elementwise affine map under a norm's name."""

    def __init__(self, d):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.ones(d)), nn.Parameter(torch.zeros(d))

    def forward(self, x):
        return x * self.weight + self.bias


def test_no_norm_is_no_normalization_and_no_warning():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.LayerNorm = nn.Linear(D, D), NoNorm(D)

        def forward(self, x):
            return self.LayerNorm(x + self.fc(x))

    report = quiet_analyze(nn.Sequential(Block(), Block()), SEQ)
    assert report.entries == () and report.warnings == ()


def test_mobilebert_tiny_has_no_normalization_and_one_warning_from_param_groups():
    transformers = pytest.importorskip("transformers")
    config = transformers.MobileBertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=128,
        embedding_size=16, intra_bottleneck_size=16, true_hidden_size=16)
    assert config.normalization_type == "no_norm"
    model = transformers.MobileBertModel(config)
    ids = {"input_ids": torch.randint(0, 128, (2, 12))}
    with pytest.warns(UserWarning) as record:
        gg.param_groups(model, 1e-4, ids)
    assert [str(w.message) for w in record] == [
        "MobileBertModel has no normalization layers: returning plain groups (weights decayed, biases and 1-D "
        "parameters not)"]


@pytest.mark.parametrize("style", ["parametrizations", "hooks"])
def test_weight_norm_is_no_activation_normalization(style):
    if style == "parametrizations":
        wn = nn.utils.parametrizations.weight_norm
        g_name = "parametrizations.weight.original0"
    else:
        wn = nn.utils.weight_norm
        g_name = "weight_g"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the hook-based weight_norm is deprecated
        model = nn.Sequential(wn(nn.Linear(D, D)), nn.LayerNorm(D), wn(nn.Linear(D, 2)))
    report = quiet_analyze(model, torch.randn(2, D))
    assert roles(report) == {"1.weight": "head"}
    assert kinds(report)[f"0.{g_name}"] == "other"


@pytest.mark.parametrize("name, gammas", [
    ("poolformer_s12", 25), ("efficientformer_l1", 36), ("xcit_nano_12_p16_224", 57), ("hgnetv2_b0", 42)])
def test_timm_families_with_layer_scales_warn_about_nothing(name, gammas):
    timm = pytest.importorskip("timm")
    report = quiet_analyze(timm.create_model(name, num_classes=10), None)
    assert len(report.entries) == gammas and report.warnings == ()


# ----------------------------------------------------------------------------- after a warning


def test_param_groups_does_not_say_no_normalization_after_a_norm_looking_warning():
    class AbsNorm(nn.Module):  # normalizes by a statistic no rule knows: warned about, not recognised
        def __init__(self, d):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(d))

        def forward(self, x):
            return x / (x.abs().mean(-1, keepdim=True) + 1e-6) * self.weight

    model = nn.Sequential(nn.Linear(D, D), AbsNorm(D), nn.Linear(D, 2))
    with pytest.warns(UserWarning) as record:
        groups = gg.param_groups(model, 1e-4, SEQ)
    messages = [str(w.message) for w in record]
    assert len(messages) == 1 and messages[0].startswith("module '1' (AbsNorm) looks like a normalization")
    assert not any("no normalization layers" in m for m in messages)
    assert sum(len(g["params"]) for g in groups) == 5
