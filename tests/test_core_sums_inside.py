"""When a residual sum with no identity operand is itself part of a branch (sums.py, "a sum inside
a branch"): its result goes on into a branch of a later residual sum before it meets a
normalization or the skip of one. Each model below is small enough to say by hand which of its
sums are residual (found by mutation testing of ``Sums._feeds_a_branch``)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gammaguide.analysis import trace_model

pytestmark = pytest.mark.usefixtures("forward_pass")

D = 4
IMAGE = torch.randn(2, 3, 8, 8)


def conv_bn(cin: int, cout: int, k: int = 3) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout))


class Projection(nn.Module):
    """A ResNet block with a projection shortcut: neither operand is an identity path."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.a, self.b, self.proj = conv_bn(cin, cout), conv_bn(cout, cout), conv_bn(cin, cout, 1)

    def forward(self, x):
        return self.proj(x) + self.b(torch.relu(self.a(x)))


def sums_of(model: nn.Module) -> list[tuple[str, str]]:
    """(module whose forward ran the sum, "residual" or why not) for every sum, in execution order."""
    flow = trace_model(model, IMAGE).flow
    status = {s.node: "residual" for s in flow.sums.residual()} | flow.sums.not_residual
    return [(flow.flow.context(node), why) for node, why in sorted(status.items())]


class ThenHead(nn.Module):
    """The block's result reaches the output with no later sum: the block stays residual."""

    def __init__(self):
        super().__init__()
        self.stem, self.block, self.fc = conv_bn(3, D), Projection(D, 2 * D), nn.Linear(2 * D, 2)

    def forward(self, x):
        return self.fc(torch.relu(self.block(torch.relu(self.stem(x)))).mean((2, 3)))


class ThenSkip(nn.Module):
    """The block's result is the skip of the next block: the stream goes on through it."""

    def __init__(self):
        super().__init__()
        self.stem, self.block, self.next = conv_bn(3, D), Projection(D, 2 * D), conv_bn(2 * D, 2 * D)

    def forward(self, x):
        r = torch.relu(self.block(torch.relu(self.stem(x))))
        return (r + self.next(r)).mean((2, 3))


class ThenBranch(nn.Module):
    """The block's result is added, through a conv, to an earlier stream: part of that branch."""

    def __init__(self):
        super().__init__()
        self.stem, self.block, self.out = conv_bn(3, D), Projection(D, D), nn.Conv2d(D, D, 1)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        return (h + self.out(self.block(h))).mean((2, 3))


class ThroughANorm(nn.Module):
    """The same, but a normalization meets the block's result first: the block stays residual."""

    def __init__(self):
        super().__init__()
        self.stem, self.block = conv_bn(3, D), Projection(D, D)
        self.norm, self.out = nn.BatchNorm2d(D), nn.Conv2d(D, D, 1)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        return (h + self.out(self.norm(self.block(h)))).mean((2, 3))


class NormedAndNot(ThroughANorm):
    """The block's result goes to a normalization, and (after it, in execution order) straight into a
    later branch: the second path decides."""

    def forward(self, x):
        h = torch.relu(self.stem(x))
        r = self.block(h)
        side = self.norm(r)
        return (h + self.out(r)).mean((2, 3)) * side.mean((2, 3))


class BranchThenSkip(nn.Module):
    """The block's result is first a branch of one later sum, then the skip of another: the stream
    goes on through it, so the block stays residual."""

    def __init__(self):
        super().__init__()
        self.stem, self.block, self.next = conv_bn(3, D), Projection(D, D), conv_bn(D, D)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        r = self.block(h)
        y = h + r
        z = r + self.next(r)
        return (y * z).mean((2, 3))


class IdentityThenBranch(nn.Module):
    """A block with an identity skip inside a later branch: it has an identity operand, so it stays
    residual."""

    def __init__(self):
        super().__init__()
        self.stem, self.inner, self.out = conv_bn(3, D), conv_bn(D, D), nn.Conv2d(D, D, 1)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        z = self.out(h)
        z = z + self.inner(z)
        return (h + self.out(z)).mean((2, 3))


@pytest.mark.parametrize("model, expected", [
    (IdentityThenBranch, [("<model>", "residual"), ("<model>", "residual")]),
    (ThenHead, [("block", "residual")]),
    (ThenSkip, [("block", "residual"), ("<model>", "residual")]),
    (ThenBranch, [("block", "inside a branch"), ("<model>", "residual")]),
    (ThroughANorm, [("block", "residual"), ("<model>", "residual")]),
    (NormedAndNot, [("block", "inside a branch"), ("<model>", "residual")]),
    (BranchThenSkip, [("block", "residual"), ("<model>", "residual"), ("<model>", "residual")]),
], ids=lambda v: v.__name__ if isinstance(v, type) else "")
def test_a_sum_is_inside_a_branch_only_when_its_result_goes_on_into_one(model, expected):
    assert sums_of(model()) == expected
