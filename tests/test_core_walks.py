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
from gammaguide.walks import reachable, walk

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


class ThroughAProjectedSum(nn.Module):
    """The γ's output reaches every operand of a residual sum through the same conv (``z =
    silu(conv(h))`` written out, then ``z + f(z)``; a skip that is no conv's output keeps the sum
    from being a sum of two heads):
    it scales the whole sum, which is returned (``end="output"``), goes on to a later norm
    (``"norm"``) or reaches the output through a ReLU (``"relu"``)."""

    def __init__(self, end: str):
        super().__init__()
        self.end = end
        self.bn, self.proj = conv_bn(), nn.Conv2d(4, 4, 1, bias=False)
        self.branch = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.later = nn.BatchNorm2d(4)

    def forward(self, x):
        p = self.proj(self.bn(x))
        z = p * torch.sigmoid(p)
        y = z + self.branch(z)
        if self.end == "norm":
            return self.later(y)
        return torch.relu(y) if self.end == "relu" else y


@pytest.mark.parametrize(("end", "role", "line"), [
    ("output", "head", "reaches the model output through proj with no normalization in between"),
    ("relu", "head", "reaches the model output through proj with no normalization in between"),
    ("norm", "scale_invariant", "every path meets another normalization first (later)"),
])
def test_a_walk_through_a_sum_it_scales_whole_ends_after_it(end, role, line):
    """Not at the sum (it is no branch and no skip of this γ): a head where the sum is the output
    or reaches it, the later norm's role where one follows; a head event only at the output."""
    [entry] = [e for e in gg.analyze(ThroughAProjectedSum(end), X).entries if e.param_name == "bn.1.weight"]
    assert entry.role == role
    assert line in entry.reason


class HalfThroughAProjectedSum(nn.Module):
    """As ThroughAProjectedSum, the skip laid side by side with other features and the branch a
    depthwise conv: the γ reaches channels 0-3 of every operand, so of the returned sum."""

    def __init__(self):
        super().__init__()
        self.bn, self.proj, self.other = conv_bn(), nn.Conv2d(4, 4, 1, bias=False), nn.Conv2d(4, 4, 1)
        self.branch = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)

    def forward(self, x):
        p = self.proj(self.bn(x))
        z = torch.cat([p * torch.sigmoid(p), self.other(x)], 1)
        return z + self.branch(z)


def test_the_head_event_at_a_returned_sum_says_which_elements_carry_the_gamma():
    from gammaguide.verify import _mask_tensor

    df = trace_model(HalfThroughAProjectedSum(), X, on_meta=False).flow
    [u] = df.uses()["bn.1.weight"]
    [event] = df.events(u)
    assert (event.role, df.flow.names[event.node], event.operand) == ("head", "add", -1)
    scaled, mixed = event.reach
    assert mixed is None
    expected = torch.zeros(2, 8, 8, 8, dtype=torch.bool)
    expected[:, :4] = True
    assert torch.equal(_mask_tensor(scaled, expected.shape), expected)


class NormlessBranch(nn.Module):
    """``h + conv(h)`` with no norm in the branch: the same sum is reached directly (the skip) and
    through a conv (the branch); the skip's arrival has no weighted op on its way: stream."""

    def __init__(self):
        super().__init__()
        self.bn, self.branch, self.head = conv_bn(), nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.Conv2d(4, 2, 1)

    def forward(self, x):
        h = self.bn(x)
        return self.head(h + self.branch(h))


class ReturnedAndTwoSkips(nn.Module):
    """The γ's output is returned (head) and is the skip of two sums (stream): a walk that has found
    the head must not stop while one sum waits to be looked at and another is still ahead."""

    def __init__(self):
        super().__init__()
        self.bn, self.f, self.g = conv_bn(), conv_bn(), conv_bn()

    def forward(self, x):
        h = self.bn(x)
        return h, h + self.f(h), h + self.g(h)


class ReturnedAndSkipThroughAReLU(nn.Module):
    """As ReturnedAndTwoSkips, the skip through a ReLU that also feeds another output: the walk
    knows a sum is ahead only if the ReLU's reach counts every one of its successors."""

    def __init__(self):
        super().__init__()
        self.bn, self.f = conv_bn(), conv_bn()

    def forward(self, x):
        h = self.bn(x)
        r = torch.relu(h)
        return h, r + self.f(h), torch.tanh(r)


class BothWaysIntoADepthwiseConv(nn.Module):
    """The γ's output and a conv of it, laid side by side, into a depthwise conv: the depthwise conv
    is reached directly and through a conv, its two arrivals carry different channels, and only
    together are they all of them, which a LayerNorm over the channels then divides out."""

    def __init__(self):
        super().__init__()
        self.bn, self.mix = conv_bn(), nn.Conv2d(4, 4, 1, bias=False)
        self.depthwise, self.norm = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.LayerNorm(8)

    def forward(self, x):
        h = self.bn(x)
        return self.norm(self.depthwise(torch.cat([h, self.mix(h)], 1)).permute(0, 2, 3, 1))


def test_a_skip_reached_directly_is_the_stream_though_its_branch_is_reached_through_a_conv(roles):
    report = gg.analyze(NormlessBranch(), X)
    assert roles(report)["bn.1.weight"] == "stream"


@pytest.mark.parametrize("model", [ReturnedAndTwoSkips, ReturnedAndSkipThroughAReLU])
def test_a_returned_gamma_that_is_also_a_skip_is_the_stream(model, roles):
    assert roles(gg.analyze(model(), X))["bn.1.weight"] == "stream"


def test_what_reaches_an_op_directly_and_through_a_conv_is_taken_together(roles):
    assert roles(gg.analyze(BothWaysIntoADepthwiseConv(), X))["bn.1.weight"] == "scale_invariant"


def test_a_returned_norm_output_reaches_the_output_through_nothing():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, bias=False), nn.BatchNorm2d(4))
    [entry] = gg.analyze(model, X).entries
    assert entry.role == "head"
    assert "reaches the model output with no normalization in between" in entry.reason


class BranchThenActivationOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = conv_bn()

    def forward(self, x):
        b = self.block(x)
        return x + b, torch.relu(b)


def test_a_walk_stops_once_its_role_is_decided():
    """The γ ends the branch of the only sum (residual_last), then reaches the output through a ReLU:
    with no sum ahead nothing can outrank residual_last, so the walk that may stop ends at the sum,
    while the full walk goes on to the output (a head event)."""
    df = trace_model(BranchThenActivationOut(), X).flow
    [u] = df.uses()["block.1.weight"]
    assert [e.role for e in walk(df.flow, df.sums, u, reachable(df.flow, df.sums))] == ["residual_last"]
    assert [e.role for e in df.events(u)] == ["residual_last", "head"]


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
    "returned_and_two_skips": (lambda: ReturnedAndTwoSkips(), X),
    "returned_and_skip_through_a_relu": (lambda: ReturnedAndSkipThroughAReLU(), X),
    "normless_branch": (lambda: NormlessBranch(), X),
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
