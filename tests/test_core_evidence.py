"""The one line of evidence each γ's role comes with (``Entry.reason``): exact text for every kind
of walk ending, on models small enough to read (found by mutation testing of roles.evidence)."""

from __future__ import annotations

import torch
from torch import nn

import gammaguide as gg
from gammaguide.analysis import trace_model
from gammaguide.models import create_model
from gammaguide.roles import evidence


def reasons(model: nn.Module, x: torch.Tensor) -> dict[str, tuple[str, str]]:
    return {e.param_name: (e.role, e.reason) for e in gg.analyze(model, x, warn=False).entries}


def test_the_resnets_four_roles_say_where_the_gamma_sits():
    got = reasons(create_model("resnet20"), torch.randn(2, 3, 32, 32))
    assert got["bn1.weight"] == ("stream", "its output is the skip (identity) input of the residual add in layers.0.0")
    assert got["layers.0.0.bn1.weight"] == ("scale_invariant",
                                            "every path meets another normalization first (layers.0.0.bn2)")
    assert got["layers.0.0.bn2.weight"] == ("residual_last",
                                            "reaches the residual add in layers.0.0 on the branch side")
    assert got["layers.1.0.shortcut.1.weight"] == ("shortcut", "lies inside the skip path of the residual add in "
                                                               "layers.1.0")


class SkipThrough(nn.Module):
    """bn0's output reaches the sum's skip side through a 1x1 convolution."""

    def __init__(self):
        super().__init__()
        self.bn0, self.proj = nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1)
        self.body, self.bn1 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.bn0(x)
        return self.proj(y) + self.bn1(self.body(y))


def test_a_shortcut_reached_through_an_op_names_the_op():
    got = reasons(SkipThrough(), torch.randn(2, 4, 8, 8))
    assert got["bn0.weight"] == ("shortcut", "reaches the skip side of the residual add in <model> through proj")


class ThreeNorms(nn.Module):
    """bn feeds three normalized paths (the evidence names two), whose γ end at the output."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)
        self.a, self.b, self.c = (nn.Conv2d(4, 4, 1) for _ in range(3))
        self.na, self.nb, self.nc = (nn.BatchNorm2d(4) for _ in range(3))

    def forward(self, x):
        y = self.bn(self.conv(x))
        return self.na(self.a(y)) * self.nb(self.b(y)) * self.nc(self.c(y))


def test_scale_invariant_names_at_most_two_norms_and_a_head_without_an_op_says_so():
    got = reasons(ThreeNorms(), torch.randn(2, 3, 8, 8))
    assert got["bn.weight"] == ("scale_invariant", "every path meets another normalization first (na, nb)")
    assert got["nc.weight"] == ("head", "reaches the model output with no normalization in between")


class Head(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.bn(self.conv(x)).mean((2, 3)))


def test_a_head_reached_through_an_op_names_it():
    got = reasons(Head(), torch.randn(2, 3, 8, 8))
    assert got["bn.weight"] == ("head", "reaches the model output through fc with no normalization in between")


class Merged(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.b1, self.c2 = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Conv2d(3, 4, 1)
        self.mix, self.bn = nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.mix(torch.cat([self.b1(self.c1(x)), self.c2(x)], 1)))


def test_a_merged_gamma_names_the_norm_after_the_mixing():
    got = reasons(Merged(), torch.randn(2, 3, 8, 8))
    assert got["b1.weight"] == ("merged", "its output is mixed with other features before bn normalizes it, so the "
                                          "network is not invariant to its scale")


class MergedTwice(Merged):
    """b1's output is mixed with other features, then normalized by two norms."""

    def __init__(self):
        super().__init__()
        self.mix2, self.bn2 = nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x):
        both = torch.cat([self.b1(self.c1(x)), self.c2(x)], 1)
        return self.bn(self.mix(both)) + self.bn2(self.mix2(both))


def test_a_merged_gamma_names_the_norms_after_the_mixing_that_its_walk_reached():
    # The analysis's walk stops at the first norm once nothing stronger can follow: it names bn.
    got = reasons(MergedTwice(), torch.randn(2, 3, 8, 8))
    assert got["b1.weight"] == ("merged", "its output is mixed with other features before bn normalizes it, so "
                                          "the network is not invariant to its scale")
    # A walk run to the end (``Dataflow.events``) reaches both, and the evidence names them.
    df = trace_model(MergedTwice(), torch.randn(2, 3, 8, 8)).flow
    [u] = df.uses()["b1.weight"]
    assert evidence(df.flow, df.events(u))["merged"] == (
        "its output is mixed with other features before bn, bn2 normalizes it, so the network is not invariant "
        "to its scale")
