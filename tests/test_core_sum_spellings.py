"""A reduction that adds whole tensors laid side by side is a sum, however it is spelled.

``torch.stack([x, b]).sum(0)`` was a sum already; so are the same tensors concatenated and viewed
with a new leading dimension, an ``einsum`` over a stacked pair (a permute, then a sum), a stack or
concatenation along a new last dimension, and a mean. A reduction that also adds elements of one
tensor together (a concatenation along the batch, summed over the batch) adds no operands."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gammaguide as gg

pytestmark = pytest.mark.usefixtures("forward_pass")

D = 8


def add(spelling: str, x: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if spelling == "x + b":
        return x + b
    if spelling == "cat.view.sum":
        return torch.cat([x, b]).view(2, *x.shape).sum(0)
    if spelling == "cat.view.mean":
        return torch.cat([b, x]).reshape(2, *x.shape).mean(dim=0)
    if spelling == "cat channels.view.sum":
        return torch.cat([x, b], dim=1).view(x.shape[0], 2, *x.shape[1:]).sum(1)
    if spelling == "einsum stack":
        return torch.einsum("k...->...", torch.stack([x, b]))
    if spelling == "einsum named":
        return torch.einsum("kbchw->bchw", torch.stack([b, x]))
    if spelling == "stack last.sum":
        return torch.stack([x, b], dim=-1).sum(-1)
    if spelling == "cat unsqueezed.sum":
        return torch.cat([x.unsqueeze(-1), b.unsqueeze(-1)], -1).sum(-1)
    if spelling == "stack(dim=1).sum(dim=1)":
        return torch.stack([x, b], dim=1).sum(dim=1)
    if spelling == "addcmul, the branch second":
        return torch.addcmul(x, torch.full_like(b, 0.5), b)
    if spelling == "addcmul, the branch first":
        return torch.addcmul(x, b, torch.full_like(b, 0.5))
    if spelling == "stack.permute.sum":
        return torch.stack([b, x], -1).permute(4, 0, 1, 2, 3).sum(0)
    raise AssertionError(spelling)


SPELLINGS = ["x + b", "cat.view.sum", "cat.view.mean", "cat channels.view.sum", "einsum stack", "einsum named",
             "stack last.sum", "cat unsqueezed.sum", "stack(dim=1).sum(dim=1)", "stack.permute.sum",
             "addcmul, the branch second", "addcmul, the branch first"]


class Block(nn.Module):
    def __init__(self, spelling: str):
        super().__init__()
        self.spelling = spelling
        self.conv1, self.bn1 = nn.Conv2d(D, D, 3, padding=1, bias=False), nn.BatchNorm2d(D)
        self.conv2, self.bn2 = nn.Conv2d(D, D, 3, padding=1, bias=False), nn.BatchNorm2d(D)

    def forward(self, x):
        b = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(add(self.spelling, x, b))


def resnet(spelling: str) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, D, 3, padding=1, bias=False), nn.BatchNorm2d(D), nn.ReLU(), Block(spelling),
                         Block(spelling), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(D, 3))


EXPECTED = {"1.weight": "stream", "3.bn1.weight": "scale_invariant", "3.bn2.weight": "residual_last",
            "4.bn1.weight": "scale_invariant", "4.bn2.weight": "residual_last"}
IMAGE = torch.randn(2, 3, 8, 8)


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_every_spelling_is_a_residual_sum(spelling, roles):
    report = gg.analyze(resnet(spelling), IMAGE, warn=False)
    assert roles(report) == EXPECTED
    assert [r.module_name for r in report.residual_adds] == ["3", "4"]
    assert all(r.branches == 1 for r in report.residual_adds)


@pytest.mark.parametrize("spelling", ["cat.view.sum", "einsum stack", "cat unsqueezed.sum"])
def test_spelled_sums_hold_numerically(spelling):
    checks = {c.param_name: (c.role, c.result) for c in gg.verify(resnet(spelling), IMAGE)}
    assert checks["3.bn2.weight"] == ("residual_last", "pass")
    assert checks["4.bn2.weight"] == ("residual_last", "pass")
    assert checks["3.bn1.weight"] == ("scale_invariant", "pass")


class BatchSum(nn.Module):
    """Concatenated along the batch and summed over it: samples of one tensor are added too."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(D, D, 3, padding=1, bias=False), nn.BatchNorm2d(D)

    def forward(self, x):
        return torch.cat([x, self.bn(self.conv(x))]).sum(0, keepdim=True)


def test_a_reduction_within_a_tensor_adds_no_operands():
    model = nn.Sequential(nn.Conv2d(3, D, 3, padding=1, bias=False), nn.BatchNorm2d(D), BatchSum())
    report = gg.analyze(model, IMAGE, warn=False)
    assert report.residual_adds == ()
    assert {e.role for e in report.entries} == {"head"}


class ThreeLaidSideBySide(nn.Module):
    """``x`` and two branches concatenated, viewed and summed: a sum of three operands, each
    found at its own offset of the concatenation."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, D, 3, padding=1, bias=False), nn.BatchNorm2d(D))
        self.a = nn.Sequential(nn.Conv2d(D, D, 3, padding=1, bias=False), nn.BatchNorm2d(D))
        self.b = nn.Sequential(nn.Conv2d(D, D, 1, bias=False), nn.BatchNorm2d(D))

    def forward(self, x):
        h = self.stem(x)
        return torch.cat([self.a(h), h, self.b(h)]).view(3, *h.shape).sum(0).mean((2, 3))


def test_three_tensors_laid_side_by_side_are_three_operands(roles):
    report = gg.analyze(ThreeLaidSideBySide(), IMAGE, warn=False)
    [add] = report.residual_adds
    assert add.branches == 2
    assert roles(report) == {"stem.1.weight": "stream", "a.1.weight": "residual_last", "b.1.weight": "residual_last"}


HALVES = torch.full((2, D, 8, 8), 0.5)  # no op of the traced pass makes it
NOT_SUMS = {
    # the stacked tensor is used again: the reduction is not all that happens to it
    "stack used twice": lambda h, b: (lambda s: s.sum(0) * s.amax())(torch.stack([h, b])),
    # an unsqueezed operand that is used again
    "unsqueezed used twice": lambda h, b: (lambda u: torch.cat([u, b.unsqueeze(0)]).sum(0) * u.mean())(h.unsqueeze(0)),
    # summed over another dimension than the one the tensors were laid along
    "summed along channels": lambda h, b: torch.stack([h, b], 1).sum(2),
    # summed along the batch, not along the dimension the tensors were stacked on
    "summed along the batch": lambda h, b: torch.stack([h, b]).sum(1),
    # a relu between the stack and the reduction: not a sum of the tensors
    "a relu between": lambda h, b: torch.stack([h, b]).relu().sum(0),
    # the stack, viewed, is used again
    "viewed stack used twice": lambda h, b: (lambda v: v.sum(0) * v.amax())(torch.stack([h, b]).view(2, -1)),
    # one tensor stacked alone
    "a stack of one": lambda h, b: torch.stack([h]).sum(0) * b,
    # a constant laid beside the tensor: adding it adds no operand
    "a constant beside": lambda h, b: torch.stack([h, torch.full(h.shape, 0.5)]).sum(0) * b,
    "a tensor made before the forward pass beside": lambda h, b: torch.stack([h, HALVES]).sum(0) * b,
    # each tensor spans two indices of the reduced dimension
    "two indices each": lambda h, b: torch.cat([h, b], 1).view(h.shape[0], 4, D // 2, *h.shape[2:]).sum(1),
}


@pytest.mark.parametrize("name", sorted(NOT_SUMS))
def test_reductions_that_do_not_add_whole_tensors_are_no_sums(name):
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, D, 3, padding=1, bias=False), nn.BatchNorm2d(D))
            self.branch = nn.Sequential(nn.Conv2d(D, D, 3, padding=1, bias=False), nn.BatchNorm2d(D))

        def forward(self, x):
            h = self.stem(x)
            return NOT_SUMS[name](h, self.branch(h))

    assert gg.analyze(Model(), IMAGE, warn=False).residual_adds == ()
