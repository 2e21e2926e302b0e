"""The rules of norms.py one at a time, each on the smallest model that tells it apart: which
parameters a hand-written normalization's γ and β are, which modules are no normalization, and
which norm-looking modules are warned about (issue 24: behaviours that no other test pinned)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import gammaguide as gg
from gammaguide.norms import NORM_OPS, op_label

D = 8
SEQ = torch.randn(2, 5, D)
IMG = torch.randn(2, 2, 4, 4)


def quiet(model: nn.Module, x) -> gg.Report:
    """analyze, failing the test on any warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return gg.analyze(model, x)


def warned(model: nn.Module, x) -> tuple[gg.Report, list[str]]:
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        report = gg.analyze(model, x)
    return report, [str(w.message) for w in record]


def kinds(report: gg.Report) -> dict[str, str]:
    return {p.name: p.kind for p in report.params}


def roles(report: gg.Report) -> dict[str, str]:
    return {e.param_name: e.role for e in report.entries}


class Block(nn.Module):
    """``x + fc(norm(proj(x)))``, then a head: the norm's γ ends the branch (residual_last)."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.proj, self.norm, self.fc, self.head = nn.Linear(D, D), norm, nn.Linear(D, D), nn.Linear(D, 3)

    def forward(self, x):
        return self.head(x + self.fc(self.norm(self.proj(x))))


# ----------------------------------------------------------------------------- the behavioural rule


class HandRms(nn.Module):
    """An RMS norm under a name no registry knows: its first op squares the input."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(D))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


class MatmulMeanRms(nn.Module):
    """The mean square taken by a matmul with a constant averaging buffer: no weighted op."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(D))
        self.register_buffer("avg", torch.full((D, 1), 1.0 / D))

    def forward(self, x):
        return x * torch.rsqrt((x * x) @ self.avg + 1e-6) * self.weight


def test_a_hand_written_rms_norm_is_found_by_its_behaviour_after_other_calls():
    report = quiet(Block(HandRms()), SEQ)
    found = [(e.param_name, e.norm_type, e.role) for e in report.entries]
    assert found == [("norm.weight", "HandRms", "residual_last")]


def test_a_matmul_between_activations_and_a_buffer_is_no_weighted_op():
    report = quiet(Block(MatmulMeanRms()), SEQ)
    assert [(e.param_name, e.norm_type) for e in report.entries] == [("norm.weight", "MatmulMeanRms")]


class TanhMinusVar(nn.Module):
    """A parameter scales the input; a statistic is subtracted afterwards, never divided by."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(D))

    def forward(self, x):
        return torch.tanh(x) * self.w - x.var(-1, keepdim=True)


class ChildScaleOverStd(nn.Module):
    """The parameter divided by a statistic belongs to a child module: not this module's γ."""

    def __init__(self):
        super().__init__()
        self.holder = nn.Module()
        self.holder.g = nn.Parameter(torch.ones(D))
        self.w = nn.Parameter(torch.zeros(D))

    def forward(self, x):
        return x * (self.holder.g / torch.sqrt(x.var(-1, keepdim=True) + 1e-5)) + self.w


@pytest.mark.parametrize("module", [TanhMinusVar, ChildScaleOverStd])
def test_a_statistic_that_normalizes_nothing_through_the_modules_own_parameter_is_no_norm(module):
    report = gg.analyze(Block(module()), SEQ)
    assert report.entries == ()
    assert "gamma" not in kinds(report).values() and "beta" not in kinds(report).values()


class FusedLn(nn.Module):
    """A hand-written module that calls the fused kernel with its own weight and bias."""

    def __init__(self):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.ones(D)), nn.Parameter(torch.zeros(D))

    def forward(self, x):
        return F.layer_norm(x, (D,), self.weight, self.bias)


class FusedBnParamStats(nn.Module):
    """Old code that keeps its running statistics as frozen parameters, in the fused kernel."""

    def __init__(self):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.ones(D)), nn.Parameter(torch.zeros(D))
        self.mean = nn.Parameter(torch.zeros(D), requires_grad=False)
        self.var = nn.Parameter(torch.ones(D), requires_grad=False)

    def forward(self, x):
        return F.batch_norm(x.transpose(1, 2), self.mean, self.var, self.weight, self.bias).transpose(1, 2)


@pytest.mark.parametrize("module", [FusedLn, FusedBnParamStats])
def test_a_fused_kernel_given_the_modules_weight_and_bias(module):
    report = quiet(Block(module()), SEQ)
    assert [(e.param_name, e.norm_type, e.role) for e in report.entries] == [
        ("norm.weight", module.__name__, "residual_last")]
    found = {n: k for n, k in kinds(report).items() if n.startswith("norm.")}
    assert found["norm.weight"] == "gamma" and found["norm.bias"] == "beta"
    assert {found.get("norm.mean", "other"), found.get("norm.var", "other")} == {"other"}


class FoldedLn(nn.Module):
    """A LayerNorm with its γ folded into the scale first: ``w / std(x)``, the statistic the
    call's first op."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(D))

    def forward(self, x):
        scale = self.weight / x.std(-1, keepdim=True)
        return (x - x.mean(-1, keepdim=True)) * scale


def test_a_gamma_divided_by_the_calls_first_op_a_statistic():
    report = quiet(Block(FoldedLn()), SEQ)
    assert [(e.param_name, e.norm_type) for e in report.entries] == [("norm.weight", "FoldedLn")]


class RmsOverTemperature(HandRms):
    """A learned scalar divides the normalized output: neither γ nor β."""

    def __init__(self):
        super().__init__()
        self.t = nn.Parameter(torch.ones(()))

    def forward(self, x):
        return super().forward(x) / self.t


class RmsMinusShift(HandRms):
    """A shift subtracted from the normalized output is its β, as one added is."""

    def __init__(self):
        super().__init__()
        self.shift = nn.Parameter(torch.zeros(D))

    def forward(self, x):
        return super().forward(x) - self.shift


def test_a_learned_temperature_is_no_beta_and_a_subtracted_shift_is_one():
    assert kinds(quiet(Block(RmsOverTemperature()), SEQ))["norm.t"] == "other"
    found = kinds(quiet(Block(RmsMinusShift()), SEQ))
    assert (found["norm.weight"], found["norm.shift"]) == ("gamma", "beta")


class StandardizedScale(nn.Module):
    """Its own parameter, layer-normalized (a standardized scale), multiplies the input: it
    normalizes a parameter, never an activation."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(D))

    def forward(self, x):
        return torch.tanh(x) * F.layer_norm(self.w, (D,))


def test_a_module_that_normalizes_its_own_parameter_is_no_normalization():
    report = quiet(Block(StandardizedScale()), SEQ)
    assert report.entries == () and kinds(report)["norm.w"] == "other"


# ----------------------------------------------------------------------------- a scale after a γ-less norm


class AffineFreeThenScale(nn.Module):
    """BatchNorm without affine, a scale and a shift (the shift written first, as a view), then
    a separate offset and a layer scale that belong to no normalization."""

    def __init__(self, c: int):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c, affine=False)
        self.g, self.b = nn.Parameter(torch.ones(1, c, 1, 1)), nn.Parameter(torch.zeros(c))
        self.offset, self.ls = nn.Parameter(torch.zeros(c, 1, 1)), nn.Parameter(torch.ones(c, 1, 1))
        self.head = nn.Conv2d(c, 3, 1)

    def forward(self, x):
        h = self.b.view(1, -1, 1, 1) + self.bn(self.conv(x)) * self.g
        return self.head(x + (h + self.offset) * self.ls)


def test_a_scale_and_shift_after_an_affine_free_norm_and_the_vectors_that_are_neither():
    report = quiet(AffineFreeThenScale(2), IMG)
    found = kinds(report)
    assert (found["g"], found["b"], found["offset"], found["ls"]) == ("gamma", "beta", "other", "other")
    assert [e.norm_type for e in report.entries] == ["BatchNorm2d without affine, then a scale"]


class AffineFreeThen(nn.Module):
    """LayerNorm without affine, then only a bias added (no scale), or a per-position mask."""

    def __init__(self, masked: bool):
        super().__init__()
        self.proj, self.ln = nn.Linear(D, D), nn.LayerNorm(D, elementwise_affine=False)
        self.shift, self.mask = nn.Parameter(torch.zeros(D)), nn.Parameter(torch.ones(2, D))
        self.head, self.masked = nn.Linear(D, 3), masked

    def forward(self, x):
        h = self.ln(self.proj(x))
        return self.head(h * self.mask if self.masked else h + self.shift)


@pytest.mark.parametrize("masked", [False, True])
def test_a_bias_or_a_matrix_after_an_affine_free_norm_is_no_gamma(masked):
    report = quiet(AffineFreeThen(masked), torch.randn(3, 2, D))
    found = kinds(report)
    assert report.entries == () and (found["shift"], found["mask"]) == ("other", "weight")


# ----------------------------------------------------------------------------- written inline


class InlineRmsReshaped(nn.Module):
    """An RMS norm written in a block, reshaped before its γ, then a layer scale."""

    def __init__(self):
        super().__init__()
        self.fc, self.w, self.ls, self.head = nn.Linear(D, D), nn.Parameter(torch.ones(D)), nn.Parameter(
            torch.ones(D)), nn.Linear(D, 3)

    def forward(self, x):
        h = self.fc(x)
        n = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)).reshape(x.shape) * self.w
        return self.head(x + n * self.ls)


def test_an_inline_norm_reshaped_before_its_gamma_then_a_layer_scale_warns_about_nothing():
    report = quiet(InlineRmsReshaped(), SEQ)
    assert [(e.param_name, e.norm_type) for e in report.entries] == [("w", "inline normalization")]
    assert kinds(report)["ls"] == "other"


class InlineGrnStatFirst(nn.Module):
    """ConvNeXt-V2's GRN written with the statistic first: ``γ·(N(x)·x) + β + x`` adds its input
    back, so it is no normalization, and no warning."""

    def __init__(self):
        super().__init__()
        self.fc, self.g, self.b, self.head = nn.Linear(D, D), nn.Parameter(torch.zeros(D)), nn.Parameter(
            torch.zeros(D)), nn.Linear(D, 3)

    def forward(self, x):
        h = self.fc(x)
        gx = torch.norm(h, p=2, dim=1, keepdim=True)
        nx = gx / (gx.mean(dim=-1, keepdim=True) + 1e-6)
        return self.head(self.g * (nx * h) + self.b + h)


def test_a_grn_written_with_the_statistic_first_is_no_normalization():
    report = quiet(InlineGrnStatFirst(), SEQ)
    assert report.entries == () and kinds(report)["g"] == "other"


class ShiftedByStd(nn.Module):
    """A statistic added to an activation, then a vector: nothing is divided by the statistic."""

    def __init__(self):
        super().__init__()
        self.fc, self.w, self.head = nn.Linear(D, D), nn.Parameter(torch.ones(D)), nn.Linear(D, 3)

    def forward(self, x):
        h = self.fc(x)
        return self.head((h + h.std(-1, keepdim=True)) * self.w)


def test_an_activation_plus_its_statistic_is_not_normalized():
    report, messages = warned(ShiftedByStd(), SEQ)
    assert report.entries == ()
    assert [m[:40] for m in messages] == ["parameter 'w' (in ShiftedByStd '') multi"]


# ----------------------------------------------------------------------------- functional norms


class StdConv(nn.Module):
    """A weight-standardized conv (timm's StdConv2d: a fused norm of the weight), a functional
    LayerNorm with only a γ, and a weight-normalized projection (a statistic of a parameter)."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(2, 2, 3, 3))
        self.g = nn.Parameter(torch.ones(2))
        self.v = nn.Parameter(torch.randn(2, 2))
        self.head = nn.Conv2d(2, 3, 1)

    def forward(self, x):
        w = F.batch_norm(self.weight.reshape(1, 2, -1), None, None, training=True, eps=1e-5).reshape_as(self.weight)
        h = F.conv2d(x, w, padding=1)
        h = F.layer_norm(h.permute(0, 2, 3, 1), (2,), self.g).permute(0, 3, 1, 2)
        proj = self.v / self.v.norm(dim=1, keepdim=True)
        h = torch.einsum("bchw,dc->bdhw", h, proj)
        return self.head(x + h / h.std(1, keepdim=True))


def test_a_norm_of_a_weight_is_none_and_a_functional_norm_may_have_no_beta():
    report, messages = warned(StdConv(), IMG)
    assert [(e.param_name, e.norm_type) for e in report.entries] == [("g", "functional layer_norm")]
    assert (kinds(report)["weight"], kinds(report)["v"]) == ("weight", "weight")
    assert messages == []


class FunctionalBetaOnly(nn.Module):
    """A functional norm given a β and no γ (``weight=None``): the β is not its γ."""

    def __init__(self, how: str):
        super().__init__()
        self.how, self.conv, self.head = how, nn.Conv2d(2, 2, 1), nn.Conv2d(2, 3, 1)
        self.b = nn.Parameter(torch.zeros(2))
        self.register_buffer("mean", torch.zeros(2))
        self.register_buffer("var", torch.ones(2))

    def forward(self, x):
        h = self.conv(x)
        if self.how == "layer_norm":
            h = F.layer_norm(h.permute(0, 2, 3, 1), (2,), None, self.b).permute(0, 3, 1, 2)
        elif self.how == "group_norm":
            h = F.group_norm(h, 1, None, self.b)
        elif self.how == "batch_norm":
            h = F.batch_norm(h, self.mean, self.var, None, self.b, training=True)
        else:
            h = F.instance_norm(h, None, None, None, self.b)
        return self.head(x + h)


@pytest.mark.parametrize("how", ["layer_norm", "group_norm", "batch_norm", "instance_norm"])
def test_a_functional_norm_with_a_beta_and_no_gamma_has_no_gamma(how):
    report = quiet(FunctionalBetaOnly(how), IMG)
    assert report.entries == ()
    assert kinds(report)["b"] == "beta"


class GammalessGroupNormThenScale(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.g, self.head = nn.Conv2d(2, 2, 1), nn.Parameter(torch.ones(1, 2, 1, 1)), nn.Conv2d(2, 3, 1)

    def forward(self, x):
        return self.head(x + F.group_norm(self.conv(x), 1) * self.g)


def test_a_scale_after_a_functional_norm_without_affine():
    report = quiet(GammalessGroupNormThenScale(), IMG)
    assert [(e.param_name, e.norm_type) for e in report.entries] == [
        ("g", "functional group_norm without affine, then a scale")]


class ScaleAndShiftInOneOp(nn.Module):
    """γ and β applied in one ``addcmul(β, x̂, γ)`` (``β + x̂ * γ``), after a γ-less norm or a norm
    written out; ``"γ first"``: ``addcmul(β, γ, x̂)``."""

    def __init__(self, how: str):
        super().__init__()
        self.how, self.conv, self.head = how, nn.Conv2d(2, 2, 1), nn.Conv2d(2, 3, 1)
        self.g, self.b = nn.Parameter(torch.ones(2, 1, 1)), nn.Parameter(torch.zeros(2, 1, 1))

    def forward(self, x):
        h = self.conv(x)
        if self.how == "written out":
            h = h * torch.rsqrt(h.pow(2).mean(1, keepdim=True) + 1e-6)
        else:
            h = F.group_norm(h, 1)
        h = torch.addcmul(self.b, self.g, h) if self.how == "γ first" else torch.addcmul(self.b, h, self.g)
        return self.head(x + h)


@pytest.mark.parametrize(("how", "norm_type"), [
    ("γ second", "functional group_norm without affine, then a scale"),
    ("γ first", "functional group_norm without affine, then a scale"),
    ("written out", "inline normalization"),
])
def test_a_scale_and_shift_in_one_addcmul_is_the_norms_gamma_and_beta(how, norm_type):
    report = quiet(ScaleAndShiftInOneOp(how), IMG)
    assert [(e.param_name, e.norm_type, e.role) for e in report.entries] == [("g", norm_type, "residual_last")]
    assert (kinds(report)["g"], kinds(report)["b"]) == ("gamma", "beta")


def test_op_labels_read_as_users_write_them():
    assert {n: op_label(n) for n in ("native_layer_norm", "_fused_rms_norm", "group_norm")} == {
        "native_layer_norm": "layer_norm", "_fused_rms_norm": "fused_rms_norm", "group_norm": "group_norm"}
    assert not any(op_label(n).startswith(("_", "native_")) for n in NORM_OPS)


# ----------------------------------------------------------------------------- module calls


class FP32LayerNorm(nn.Module):
    """A known norm class (the registry has this name) that casts and calls a LayerNorm held in a
    Sequential: the LayerNorm's call lies two levels inside the known norm's call."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Sequential(nn.LayerNorm(D))

    def forward(self, x):
        return self.inner(x.float()).type_as(x)


class LPLayerNorm(FP32LayerNorm):
    """A known norm class (the registry has this name) with a γ of its own, scaling the output of
    the LayerNorm it calls."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(D))

    def forward(self, x):
        return super().forward(x) * self.weight


def test_a_norm_called_inside_a_known_norm_is_one_normalization():
    report = quiet(nn.Sequential(nn.Linear(D, D), nn.LayerNorm(D), FP32LayerNorm(), nn.Linear(D, 3)), SEQ)
    reasons = {e.param_name: (e.role, e.reason) for e in report.entries}
    assert reasons["1.weight"] == ("scale_invariant", "every path meets another normalization first (2)")
    assert roles(quiet(LPLayerNorm(), SEQ)) == {"weight": "head", "inner.0.weight": "head"}
    report = quiet(Block(FP32LayerNorm()), SEQ)
    assert roles(report) == {"norm.inner.0.weight": "residual_last"}
    alone = quiet(FP32LayerNorm(), SEQ)
    assert roles(alone) == {"inner.0.weight": "head"}


def test_a_norm_module_analyzed_alone_names_its_parameters_without_a_prefix():
    from test_core_norm_detection import PyBatchNorm

    report = quiet(PyBatchNorm(2), IMG)
    assert kinds(report) == {"weight": "gamma", "bias": "beta"}


class Unused(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj, self.spare, self.spare_norm, self.head = nn.Linear(D, D), nn.Linear(D, D), nn.LayerNorm(D), \
            nn.Linear(D, 3)

    def forward(self, x):
        return self.head(self.proj(x))


def test_modules_the_pass_never_ran():
    report, messages = warned(Unused(), SEQ)
    assert roles(report) == {"spare_norm.weight": "unused"}
    assert [m[:54] for m in messages] == ["the traced forward pass did not reach spare_norm: the "]
    assert kinds(report)["spare.weight"] == "weight"


# ----------------------------------------------------------------------------- warnings


class FrozenBatchNorm2d(nn.Module):
    """torchvision's frozen BatchNorm: every tensor a buffer, normalizing by constants."""

    def __init__(self, c):
        super().__init__()
        for name, value in (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0), ("running_var", 1.0)):
            self.register_buffer(name, torch.full((c,), value))

    def forward(self, x):
        scale = self.weight * (self.running_var + 1e-5).rsqrt()
        return x * scale[None, :, None, None] + (self.bias - self.running_mean * scale)[None, :, None, None]


class Standardize(nn.Module):
    """No parameters; running statistics in eval mode, and a training-mode pass that needs values."""

    def __init__(self, c):
        super().__init__()
        self.register_buffer("mean", torch.zeros(c))
        self.register_buffer("var", torch.ones(c))

    def forward(self, x):
        if self.training and bool(x.std() > 0):
            return (x - x.mean()) / x.std()
        return (x - self.mean[None, :, None, None]) / torch.sqrt(self.var[None, :, None, None] + 1e-5)


class Gated(nn.Module):
    """A parameter and a buffer (a training candidate) whose training-mode pass needs values, and
    that takes no statistic in eval mode: nothing to warn about."""

    def __init__(self, c):
        super().__init__()
        self.w = nn.Parameter(torch.ones(c))
        self.register_buffer("mask", torch.ones(c))

    def forward(self, x):
        if self.training and bool(x.sum() > 0):
            return x
        return x * (self.w * self.mask)[None, :, None, None]


@pytest.mark.parametrize("module", [FrozenBatchNorm2d, Standardize, Gated])
def test_modules_that_are_no_normalization_to_analyze_are_not_warned_about(module):
    model = nn.Sequential(nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2), module(2), nn.Conv2d(2, 3, 1))
    report = quiet(model, IMG)
    assert roles(report) == {"1.weight": "head"}


class AbsNorm(nn.Module):
    """Divides by a mean absolute value, which is no statistic the rule knows: a warning."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(D))

    def forward(self, x):
        return self.weight * x / x.abs().mean(-1, keepdim=True)


class CenterNorm(nn.Module):
    """Named like a norm, owns a parameter and a child, centres but never scales: a warning."""

    def __init__(self):
        super().__init__()
        self.w, self.act = nn.Parameter(torch.ones(D)), nn.Tanh()

    def forward(self, x):
        return self.act(x - x.mean(-1, keepdim=True)) * self.w


class ParamFreeNorm(nn.Module):
    """Normalizes without parameters; a scale after it would be its γ if it were known."""

    def forward(self, x):
        return (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, keepdim=True) + 1e-5)


def test_each_unrecognised_norm_looking_module_is_one_warning_and_an_affine_map_none():
    from test_core_norm_detection import NoNorm  # MobileBERT's affine map: reduces nothing

    model = nn.Sequential(nn.Linear(D, D), nn.LayerNorm(D), NoNorm(D), AbsNorm(), CenterNorm(), ParamFreeNorm(),
                          nn.Linear(D, 3))
    report, messages = warned(model, SEQ)
    assert roles(report) == {"1.weight": "head"}
    assert [m.split(" looks like")[0] for m in messages] == [
        "module '3' (AbsNorm)", "module '4' (CenterNorm)", "module '5' (ParamFreeNorm)"]


class Squashed(nn.Module):
    """A vector scales a tensor normalized outside any normalization, twice, from the right."""

    def __init__(self):
        super().__init__()
        self.fc, self.scale, self.head = nn.Linear(D, D), nn.Parameter(torch.ones(D)), nn.Linear(D, 3)

    def forward(self, x):
        h = self.fc(x)
        t = torch.tanh(h / h.std(-1, keepdim=True))
        return self.head(t * self.scale + torch.sigmoid(t) * self.scale)


def test_a_vector_scaling_a_normalized_tensor_deep_in_the_model_is_one_warning_naming_its_module():
    model = nn.Sequential(nn.Sequential(Squashed()))
    report, messages = warned(model, SEQ)
    assert report.entries == ()
    assert [m[:87] for m in messages] == [
        "parameter '0.0.scale' (in Squashed '0.0') multiplies a tensor normalized by a statistic"]


def test_verify_traces_without_a_training_probe():
    from test_core_norm_detection import Masked, basic_net

    checks = gg.verify(nn.Sequential(basic_net(nn.BatchNorm2d), Masked(4)), torch.randn(4, 3, 8, 8))
    assert {c.param_name: (c.role, c.result) for c in checks} == {
        "0.1.weight": ("stream", "not_applicable"), "0.2.n1.weight": ("scale_invariant", "pass"),
        "0.2.n2.weight": ("residual_last", "pass")}


class PostNormBlock(nn.Module):
    """Named like a norm, owns parameters and a linear: a block whose normalization (a functional
    LayerNorm with the block's own weight) was found inside it. No warning for it; the warnings for
    the modules after it still come."""

    def __init__(self):
        super().__init__()
        self.fc, self.w, self.b = nn.Linear(D, D), nn.Parameter(torch.ones(D)), nn.Parameter(torch.zeros(D))

    def forward(self, x):
        return F.layer_norm(x + self.fc(x), (D,), self.w, self.b)


def test_a_block_named_like_a_norm_that_holds_one_is_not_warned_about_but_the_next_module_is():
    report, messages = warned(nn.Sequential(nn.Linear(D, D), PostNormBlock(), AbsNorm(), nn.Linear(D, 3)), SEQ)
    assert roles(report) == {"1.w": "head"}
    assert [m.split(" looks like")[0] for m in messages] == ["module '2' (AbsNorm)"]


class SharedScale(nn.Module):
    """A LayerNorm's γ also scales a tensor squashed after its own normalization: it has its role
    already, so no warning calls it a γ-like parameter outside a norm."""

    def __init__(self):
        super().__init__()
        self.fc, self.ln, self.head = nn.Linear(D, D), nn.LayerNorm(D), nn.Linear(D, 3)

    def forward(self, x):
        h = self.fc(x)
        return self.head(self.ln(h) + torch.tanh(h / h.std(-1, keepdim=True)) * self.ln.weight)


def test_a_recognised_gamma_used_again_outside_its_norm_is_not_warned_about():
    report, messages = warned(SharedScale(), SEQ)
    assert [e.param_name for e in report.entries] == ["ln.weight"] and messages == []
