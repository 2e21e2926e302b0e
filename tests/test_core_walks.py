"""Walks from a normalization's output (walks.py) and the role they decide (roles.py): which role
wins when walks disagree, and that a walk that stops early still finds the strongest one."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gammaguide as gg
from gammaguide import models
from gammaguide.analysis import trace_model
from gammaguide.roles import evidence, strongest

# Every test twice: analyze's default pass on meta tensors, and the real pass (conftest.py).
pytestmark = pytest.mark.usefixtures("forward_pass")

X = torch.randn(2, 4, 8, 8)

# The order docs/core.md and the README give, written out here (not read from the code): when walks
# disagree, the role that protects the skip path wins.
PRIORITY = ("stream", "shortcut", "residual_last", "head", "merged", "scale_invariant")


def conv_bn(c: int = 4) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))


class BranchAndOutput(nn.Module):
    """The γ's output ends the block's branch and is also returned (a feature the caller keeps, as
    a multi-exit network or a feature pyramid does): the walk to the output is a head, the walk to
    the sum a residual_last, and residual_last is stronger."""

    def __init__(self, output_first: bool):
        super().__init__()
        self.block, self.output_first = conv_bn(), output_first

    def forward(self, x):
        b = self.block(x)
        return (b, x + b) if self.output_first else (x + b, b)


class BranchThenSkip(nn.Module):
    """The γ's output ends the branch of one residual sum and is then the skip of a later one
    (``x + h``, then ``h + f(h)``): it is the stream of the second block, and stream wins over the
    residual_last found first (a walk must not stop at the first sum it meets)."""

    def __init__(self, skip_first: bool = False):
        super().__init__()
        self.first, self.second, self.skip_first = conv_bn(), conv_bn(), skip_first

    def forward(self, x):
        h = self.first(x)
        if self.skip_first:
            z = h + self.second(h)
            return z, x + h
        y = x + h
        return y, h + self.second(h)


class OutputAndMixed(nn.Module):
    """The γ's output is returned and also concatenated with other features that a conv mixes
    before the next norm: head (reaches the output) beats merged."""

    def __init__(self):
        super().__init__()
        self.a, self.other = conv_bn(), conv_bn()
        self.mix, self.norm = nn.Conv2d(8, 4, 1, bias=False), nn.BatchNorm2d(4)

    def forward(self, x):
        a = self.a(x)
        return a, self.norm(self.mix(torch.cat([a, self.other(x)], 1)))


class MixedAndNormalized(nn.Module):
    """The γ's output goes straight into one norm (scale-invariant there) and, concatenated with
    other features and mixed by a conv, into another (merged there): merged wins."""

    def __init__(self):
        super().__init__()
        self.a, self.other = conv_bn(), conv_bn()
        self.direct = conv_bn()
        self.mix, self.norm = nn.Conv2d(8, 4, 1, bias=False), nn.BatchNorm2d(4)

    def forward(self, x):
        a = self.a(x)
        return self.direct(a) + self.norm(self.mix(torch.cat([a, self.other(x)], 1)))


class ShortcutThenStream(nn.Module):
    """The γ's output reaches the first sum's skip through a projection conv without a norm
    (shortcut), and is the identity skip of a later sum (stream): the walk must not stop at the
    shortcut while a sum is still ahead."""

    def __init__(self):
        super().__init__()
        self.bn, self.proj = conv_bn(), nn.Conv2d(4, 4, 1, bias=False)
        self.branch, self.branch2, self.later = conv_bn(), conv_bn(), conv_bn()

    def forward(self, x):
        h = self.bn(x)
        a = self.proj(h) + self.branch2(torch.relu(self.branch(h)))
        return h + self.later(torch.relu(a))


class MergedThenHead(nn.Module):
    """The γ's output is mixed with other features before a later norm (merged), then reaches the
    output through an op that runs after it (head): the walk must not stop at merged while the
    output is still ahead."""

    def __init__(self):
        super().__init__()
        self.a, self.other = conv_bn(), nn.Conv2d(4, 4, 1, bias=False)
        self.mix, self.norm = nn.Conv2d(8, 4, 1, bias=False), nn.BatchNorm2d(4)

    def forward(self, x):
        a = self.a(x)
        return self.norm(self.mix(torch.cat([a, self.other(x)], 1))), torch.tanh(a)


def test_a_walk_goes_on_past_a_weaker_role_while_a_stronger_one_is_ahead(roles):
    assert roles(gg.analyze(ShortcutThenStream(), X))["bn.1.weight"] == "stream"
    assert roles(gg.analyze(MergedThenHead(), X))["a.1.weight"] == "head"


@pytest.mark.parametrize("output_first", [True, False])
def test_a_branch_end_that_is_also_returned_is_residual_last(output_first, roles):
    report = gg.analyze(BranchAndOutput(output_first), X)
    assert roles(report) == {"block.1.weight": "residual_last"}
    assert "branch side" in report.entries[0].reason


@pytest.mark.parametrize("skip_first", [False, True])
def test_a_branch_end_that_is_then_a_skip_is_the_stream(skip_first, roles):
    report = gg.analyze(BranchThenSkip(skip_first), X)
    assert roles(report) == {"first.1.weight": "stream", "second.1.weight": "residual_last"}
    assert "skip (identity) input" in report.entries[0].reason
    assert len(report.residual_adds) == 2


def test_a_returned_output_that_is_also_mixed_is_head(roles):
    report = gg.analyze(OutputAndMixed(), X)
    assert roles(report) == {"a.1.weight": "head", "other.1.weight": "merged", "norm.weight": "head"}


def test_a_norm_reached_directly_and_after_mixing_is_merged(roles):
    report = gg.analyze(MixedAndNormalized(), X)
    assert roles(report) == {"a.1.weight": "merged", "other.1.weight": "merged", "direct.1.weight": "head",
                             "norm.weight": "head"}


def test_strongest_follows_the_documented_priority():
    for i, weaker in enumerate(PRIORITY):
        for stronger in PRIORITY[:i]:
            outcomes = {weaker: "w", stronger: "s"}
            assert strongest(outcomes) == (stronger, "s"), (stronger, weaker)
            assert strongest(dict(reversed(outcomes.items()))) == (stronger, "s")
    assert strongest({}) == ("unused", "its output reaches no normalization, residual addition or model output")


def _early_and_full(model: nn.Module, x) -> list[tuple[str, str, str]]:
    """For every use of every γ: the role (and evidence) of the walk that stops once the role is
    decided, next to that of the walk that runs to the end, where they differ."""
    traced = trace_model(model, x)
    df = traced.flow
    nodes = sorted({u for us in df.uses().values() for u in us})
    assert nodes
    differ = []
    for u in nodes:
        early = strongest(df.walk(u))
        full = strongest(evidence(df.flow, df.events(u)))
        if early[0] != full[0] or (early[0] not in ("merged", "scale_invariant") and early != full):
            differ.append((df.name(u), early, full))
    return differ


EARLY_STOP_MODELS = {
    "resnet20": (lambda: models.create_model("resnet20"), torch.randn(1, 3, 8, 8)),
    "resnet50": (lambda: models.create_model("resnet50"), torch.randn(1, 3, 8, 8)),
    "preact_resnet18": (lambda: models.create_model("preact_resnet18"), torch.randn(1, 3, 8, 8)),
    "textcls_preln": (lambda: models.create_model("textcls_preln", vocab_size=32, width=16, layers=2),
                      torch.arange(1, 7).view(1, 6)),
    "textcls_postln": (lambda: models.create_model("textcls_postln", vocab_size=32, width=16, layers=2),
                       torch.arange(1, 7).view(1, 6)),
    "branch_then_skip": (lambda: BranchThenSkip(), X),
    "branch_and_output": (lambda: BranchAndOutput(True), X),
    "output_and_mixed": (lambda: OutputAndMixed(), X),
    "mixed_and_normalized": (lambda: MixedAndNormalized(), X),
    "shortcut_then_stream": (lambda: ShortcutThenStream(), X),
    "merged_then_head": (lambda: MergedThenHead(), X),
}


@pytest.mark.parametrize("name", sorted(EARLY_STOP_MODELS))
def test_a_walk_that_stops_early_finds_the_role_of_a_full_walk(name):
    make, x = EARLY_STOP_MODELS[name]
    assert _early_and_full(make(), x) == []


def test_an_analysis_computes_reachability_once_and_every_walk_stops_early(monkeypatch):
    """``reachable`` is what lets a walk stop once its role is decided: one pass over the graph per
    analysis, handed to every γ's walk (computed per walk, or not at all, analyses of large models
    slow down many times over with the same roles)."""
    from gammaguide import roles as roles_module

    computed, given = [], []
    real_reachable, real_walk = roles_module.reachable, roles_module.walk

    def counted(flow, sums):
        computed.append(1)
        return real_reachable(flow, sums)

    def spied(flow, sums, u, ahead=None):
        given.append(ahead)
        return real_walk(flow, sums, u, ahead)

    monkeypatch.setattr(roles_module, "reachable", counted)
    monkeypatch.setattr(roles_module, "walk", spied)
    report = gg.analyze(models.create_model("resnet20"), torch.randn(1, 3, 8, 8), warn=False)
    assert len(report.entries) == 21  # the stem's, two per block of nine, two projection shortcuts'
    assert computed == [1]
    assert len(given) == 21 and all(isinstance(a, list) for a in given)


def test_a_walk_goes_on_through_a_sum_it_reached_only_through_linears(roles):
    """FocalNet's modulation: the block norm's output feeds one linear whose chunks build the
    context sums (every operand reached through it), so the walk goes on through those sums to the
    block's residual add, whose branch it ends."""
    from timm.models.focalnet import FocalNet

    report = gg.analyze(FocalNet(depths=(1, 1, 1, 1), embed_dim=16, num_classes=10), torch.randn(1, 3, 64, 64),
                        warn=False)
    expected = {"stem.norm.weight": "stream", "norm.weight": "head"}
    for stage in range(4):
        expected |= {f"layers.{stage}.blocks.0.norm{k}.weight": "residual_last" for k in (1, 2)}
        if stage:
            expected[f"layers.{stage}.downsample.norm.weight"] = "stream"
    assert roles(report) == expected
