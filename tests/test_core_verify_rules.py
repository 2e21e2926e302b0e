"""gg.verify's rules, op by op: which ops between a γ and the next norm keep a doubling of γ and β
divisible (positively homogeneous), which ops on a branch keep a zeroed γ's branch zero, the
pass/fail thresholds, and the message of every way a check can be not applicable.

Each case is a γ (``n1``, a BatchNorm over a bias-free linear) followed by one op:
``Between`` puts the op between ``n1`` and a second norm (the role is ``scale_invariant`` or
``merged``), ``Branch`` puts it on the branch of a residual sum (``residual_last``)."""

from __future__ import annotations

import importlib
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gammaguide as gg

verify_module = importlib.import_module("gammaguide.verify")  # the package exports verify, the function

N, D = 6, 8


class Between(nn.Module):
    def __init__(self, op, bias: bool = False):
        super().__init__()
        self.op = op
        self.fc1, self.fc2 = nn.Linear(D, D, bias=False), nn.Linear(D, D, bias=bias)
        self.other = nn.Linear(D, D, bias=False)
        self.n1, self.n2 = nn.BatchNorm1d(D), nn.BatchNorm1d(D)
        self.b = nn.Parameter(torch.ones(D))

    def forward(self, x):
        h = self.op(self, self.n1(self.fc1(x)), x)
        return self.n2(self.fc2(h))


class Branch(nn.Module):
    def __init__(self, op, bias: bool = False):
        super().__init__()
        self.op = op
        self.fc1, self.fc2 = nn.Linear(D, D, bias=False), nn.Linear(D, D, bias=bias)
        self.other = nn.Linear(D, D, bias=False)
        self.n1 = nn.BatchNorm1d(D)
        self.b = nn.Parameter(torch.ones(D))

    def forward(self, x):
        return x + self.op(self, self.n1(self.fc1(x)), x)


def _attention(q, k, v):
    return F.scaled_dot_product_attention(q[None], k[None], v[None])[0]


OPS = {
    "relu": lambda m, h, x: F.relu(h),
    "tanh": lambda m, h, x: torch.tanh(h),
    "sigmoid": lambda m, h, x: torch.sigmoid(h),
    "exp": lambda m, h, x: torch.exp(h),
    "cosh": lambda m, h, x: torch.cosh(h),
    "flip": lambda m, h, x: h.flip(-1),
    "neg": lambda m, h, x: -h,
    "times a number": lambda m, h, x: h * 2.0,
    "over a number": lambda m, h, x: h / 2.0,
    "squared": lambda m, h, x: h * h,
    "relu squared": lambda m, h, x: F.relu(h) * F.relu(h),
    "times other features": lambda m, h, x: h * m.other(x),
    "relu times other features": lambda m, h, x: F.relu(h) * m.other(x),
    "over other features": lambda m, h, x: h / (m.other(x).abs() + 1),
    "plus a parameter": lambda m, h, x: h + m.b,
    "minus a parameter": lambda m, h, x: h - m.b,
    "plus a number": lambda m, h, x: h + 1.0,
    "relu plus half": lambda m, h, x: F.relu(h) + h * 0.5,
    "linear": lambda m, h, x: m.fc2(h),
    "linear of plus a number": lambda m, h, x: m.fc2(h + 1.0),
    "linear of plus a parameter": lambda m, h, x: m.fc2(h + m.b),
    "linear of relu plus half": lambda m, h, x: m.fc2(F.relu(h) + h * 0.5),
    "matmul with itself": lambda m, h, x: (h @ h.T) @ h,
    "cat, then its own part": lambda m, h, x: torch.cat([h, m.other(x)], -1)[:, :D],
    "cat with other features": lambda m, h, x: torch.cat([h[:, :4], m.other(x)[:, 4:]], -1),
    "softmax gate": lambda m, h, x: torch.softmax(h, -1) * m.other(x),
    "softmax gate of tanh": lambda m, h, x: torch.softmax(torch.tanh(h), -1) * m.other(x),
    "attention, values": lambda m, h, x: _attention(m.other(x), m.other(x), h),
    "attention, queries": lambda m, h, x: _attention(h, m.other(x), m.other(x)),
    "attention, queries and keys": lambda m, h, x: _attention(h, h, m.other(x)),
    "attention, all three": lambda m, h, x: _attention(h, h, h),
    # A homogeneous op, then one that is not: the check goes on past the first.
    "times a number, then tanh": lambda m, h, x: torch.tanh(h * 2.0),
    "relu plus half, then tanh": lambda m, h, x: torch.tanh(F.relu(h) + h * 0.5),
    "attention, values, then tanh": lambda m, h, x: torch.tanh(_attention(m.other(x), m.other(x), h)),
    "softmax gate, then tanh": lambda m, h, x: torch.tanh(torch.softmax(h, -1) * m.other(x)),
    "over a number, in place": lambda m, h, x: (h * 1.0).div_(2.0),
    "batched matmul with a weight": lambda m, h, x: torch.bmm(h[None], m.fc2.weight.T[None])[0],
    "cosh of relu plus half": lambda m, h, x: torch.cosh(F.relu(h) + h * 0.5),
}


def check(model: nn.Module, name: str = "n1.weight", **kwargs) -> gg.Check:
    return {c.param_name: c for c in gg.verify(model, torch.randn(N, D), **kwargs)}[name]


def relative_change(c: gg.Check) -> float:
    match = re.search(r"by ([0-9.e+-]+) \(relative\)", c.detail)
    assert match, c.detail
    return float(match.group(1))


# ----------------------------------------------------------------------------- doubling (scale_invariant)

@pytest.mark.parametrize("op", ["relu", "flip", "neg", "times a number", "over a number", "times other features",
                                "relu times other features", "over other features", "relu plus half", "linear",
                                "linear of relu plus half", "matmul with itself", "cat, then its own part",
                                "attention, values", "over a number, in place", "batched matmul with a weight"])
def test_a_homogeneous_op_between_two_norms_passes(op):
    c = check(Between(OPS[op]))
    assert (c.role, c.result) == ("scale_invariant", "pass"), c
    assert c.detail.startswith("doubling γ and β changed the output of the next normalization(s) by ")
    assert relative_change(c) <= 1e-3


@pytest.mark.parametrize(("op", "culprit"), [
    ("tanh", "tanh in <model>"), ("sigmoid", "sigmoid in <model>"), ("exp", "exp in <model>"),
    ("cosh", "cosh in <model>"),
    ("squared", "mul in <model>"),  # both factors carry the γ: doubling quadruples
    ("relu squared", "mul in <model>"),
    ("plus a parameter", "add in <model>"), ("minus a parameter", "sub in <model>"),
    ("plus a number", "add in <model>"),
    ("linear of plus a number", "add in <model>"), ("linear of plus a parameter", "add in <model>"),
    ("attention, all three", "_scaled_dot_product"),  # the γ in queries and keys sets the softmax's temperature
    ("times a number, then tanh", "tanh in <model>"), ("relu plus half, then tanh", "tanh in <model>"),
    ("attention, values, then tanh", "tanh in <model>"),
])
def test_an_op_that_is_not_homogeneous_makes_the_doubling_check_not_applicable(op, culprit):
    c = check(Between(OPS[op]))
    assert (c.role, c.result) == ("scale_invariant", "not_applicable"), c
    assert c.detail.startswith(f"not positively homogeneous: {culprit}"), c.detail


def test_a_biased_linear_between_two_norms_is_not_homogeneous():
    c = check(Between(OPS["linear"], bias=True))
    assert (c.role, c.result) == ("scale_invariant", "not_applicable"), c
    assert c.detail == "not positively homogeneous: addmm in fc2"


class ConvBetween(nn.Module):
    def __init__(self, bias: bool):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv1d(D, D, 3, padding=1, bias=False), nn.Conv1d(D, D, 3, padding=1, bias=bias)
        self.n1, self.n2 = nn.BatchNorm1d(D), nn.BatchNorm1d(D)

    def forward(self, x):
        return self.n2(self.conv2(F.relu(self.n1(self.conv1(x)))))


@pytest.mark.parametrize("bias", [False, True])
def test_a_convolution_is_homogeneous_without_a_bias_only(bias):
    c = {c.param_name: c for c in gg.verify(ConvBetween(bias), torch.randn(2, D, 5))}["n1.weight"]
    assert c.role == "scale_invariant"
    if bias:
        assert (c.result, c.detail) == ("not_applicable", "not positively homogeneous: convolution in conv2"), c
    else:
        assert c.result == "pass", c


# ----------------------------------------------------------------------------- doubling (merged)

@pytest.mark.parametrize("op", ["softmax gate", "attention, queries", "attention, queries and keys",
                                "cat with other features"])
def test_a_gamma_mixed_with_other_features_changes_the_next_norm(op):
    c = check(Between(OPS[op]))
    assert (c.role, c.result) == ("merged", "pass"), c
    assert c.detail.endswith("(relative); a scale-invariant γ would leave it as it was")
    assert relative_change(c) > 1e-3


@pytest.mark.parametrize("op", ["softmax gate of tanh", "softmax gate, then tanh"])
def test_a_merged_gamma_behind_a_non_homogeneous_op_is_not_checked(op):
    """Gates and sums with other features are allowed on a merged γ's way, but not a tanh."""
    c = check(Between(OPS[op]))
    assert (c.role, c.result) == ("merged", "not_applicable"), c
    assert c.detail == "not positively homogeneous: tanh in <model>"


@pytest.mark.parametrize(("role_op", "error", "result"), [
    ("relu", 1e-3, "pass"), ("relu", 1.0001e-3, "fail"),  # scale_invariant: at most rtol
    ("softmax gate", 1e-3, "fail"), ("softmax gate", 1.0001e-3, "pass"),  # merged: more than rtol
])
def test_the_threshold_is_rtol(monkeypatch, role_op, error, result):
    seen = []

    def fixed(outs, refs):
        seen.append((len(outs), len(refs)))
        return error

    monkeypatch.setattr(verify_module, "_relative_error", fixed)
    c = check(Between(OPS[role_op]), rtol=1e-3)
    assert c.result == result, c
    assert seen == [(1, 1)]  # the output of the one next norm, against its reference
    assert f"by {error:.2e} (relative)" in c.detail


# ----------------------------------------------------------------------------- zeroing (residual_last)

@pytest.mark.parametrize("op", ["relu", "tanh", "flip", "neg", "times a number", "squared", "times other features",
                                "linear", "linear of relu plus half", "matmul with itself", "attention, values",
                                "attention, all three", "cat with other features"])
def test_a_zero_preserving_branch_is_zeroed(op):
    c = check(Branch(OPS[op]))
    assert (c.role, c.result) == ("residual_last", "pass"), c
    assert c.detail == "zeroing γ and β zeroed its branch of 1 residual sum(s)"


@pytest.mark.parametrize(("op", "culprit"), [
    ("sigmoid", "sigmoid in <model>"), ("exp", "exp in <model>"),
    ("linear of plus a number", "add in <model>"), ("linear of plus a parameter", "add in <model>"),
])
def test_an_op_that_maps_zero_elsewhere_makes_the_zeroing_check_not_applicable(op, culprit):
    c = check(Branch(OPS[op]))
    assert (c.role, c.result) == ("residual_last", "not_applicable"), c
    assert c.detail == f"branch does not map zero to zero: {culprit}"


def test_a_biased_linear_on_the_branch_does_not_map_zero_to_zero():
    c = check(Branch(OPS["linear"], bias=True))
    assert (c.role, c.result) == ("residual_last", "not_applicable"), c
    assert c.detail == "branch does not map zero to zero: addmm in fc2"


@pytest.mark.parametrize("op", ["cosh", "cosh of relu plus half"])
def test_an_op_not_known_to_move_zero_that_does_fails(op):
    """cosh(0) = 1 and cosh is in no list: the measurement, not the op's name, decides (a sum of two
    of the γ's own features on the way maps zero to zero)."""
    c = check(Branch(OPS[op]))
    assert (c.role, c.result) == ("residual_last", "fail"), c
    assert c.detail == "its branch stayed non-zero (max |x| = 1)"


@pytest.mark.parametrize("op", ["softmax gate", "attention, queries", "attention, queries and keys"])
def test_a_branch_mixed_with_other_features_cannot_be_zeroed(op):
    c = check(Branch(OPS[op]))
    assert (c.role, c.result) == ("residual_last", "not_applicable"), c
    assert c.detail == "its features are mixed with others before the sum, so zeroing it cannot zero the branch"


class Lerp(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.n1 = nn.Linear(D, D, bias=False), nn.BatchNorm1d(D)

    def forward(self, x):
        return torch.lerp(x, self.n1(self.fc1(x)), 0.3)


def test_a_lerp_branch_is_not_checked():
    c = check(Lerp())
    assert (c.role, c.result) == ("residual_last", "not_applicable"), c
    assert c.detail == "a lerp adds w * (end - start): zeroing the end does not remove that branch"


# ----------------------------------------------------------------------------- an activation inside the norm module

class NormAct(nn.BatchNorm1d):
    """A BatchNorm with its activation fused in (timm's BatchNormAct2d)."""

    def __init__(self, act):
        super().__init__(D)
        self.act = act

    def forward(self, x):
        return self.act(super().forward(x))


@pytest.mark.parametrize(("kind", "act", "result", "detail"), [
    (Between, F.relu, "pass", None),
    (Between, torch.tanh, "not_applicable", "not positively homogeneous: tanh in n1"),
    (Branch, F.relu, "pass", "zeroing γ and β zeroed its branch of 1 residual sum(s)"),
    (Branch, torch.tanh, "pass", "zeroing γ and β zeroed its branch of 1 residual sum(s)"),
    # zeroing γ and β gives sigmoid(0) = 0.5 on the branch; zeroing the module's output would give 0
    (Branch, torch.sigmoid, "not_applicable", "branch does not map zero to zero: sigmoid in n1"),
])
def test_an_activation_fused_into_the_norm_is_on_the_gammas_way(kind, act, result, detail):
    model = kind(OPS["neg"])
    model.n1 = NormAct(act)
    c = check(model)
    assert c.result == result, c
    if detail is not None:
        assert c.detail == detail


# ----------------------------------------------------------------------------- a train-mode pass that differs

class TrainingSkips(nn.Module):
    """In train mode forward returns the norm's output; in eval mode it adds it to a sum
    (``"sum"``) or normalizes it again (``"norm"``). analyze sees the eval pass, verify the train one."""

    def __init__(self, what: str):
        super().__init__()
        self.what = what
        self.fc1, self.n1, self.n2 = nn.Linear(D, D, bias=False), nn.BatchNorm1d(D), nn.BatchNorm1d(D)

    def forward(self, x):
        h = self.n1(self.fc1(x))
        if self.training:
            return h
        return x + h if self.what == "sum" else self.n2(h)


@pytest.mark.parametrize(("what", "role", "detail"), [
    ("sum", "residual_last", "the train-mode pass reaches no residual sum"),
    ("norm", "scale_invariant", "the train-mode pass reaches no other normalization"),
])
def test_a_train_mode_pass_without_the_sum_or_the_norm_is_not_checked(what, role, detail):
    checks = {c.param_name: c for c in gg.verify(TrainingSkips(what).eval(), torch.randn(N, D))}
    assert (checks["n1.weight"].role, checks["n1.weight"].result, checks["n1.weight"].detail) == (
        role, "not_applicable", detail)
    other = checks["n2.weight"]
    assert (other.result, other.detail) == ("not_applicable", f"no numerical check for role {other.role}")
