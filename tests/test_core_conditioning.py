"""Conditioning adds: an embedding of another input added to a block's features is no skip.

A diffusion U-Net block adds ``time_mlp(t)`` to its features, a class-conditioned block adds an
embedding of the label, a FiLM block shifts its features by a vector computed from a condition.
From the second block on, the stream itself depends on that embedding (the first block added it),
so the embedding and the features share an ancestor; still only an operand that carries the stream
the other operands are computed from is a skip. So the same norm has the same role in every block,
and a norm inside the embedding's MLP is never taken for a shortcut."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gammaguide as gg
from gammaguide.analysis import trace_model

pytestmark = pytest.mark.usefixtures("forward_pass")

C, T = 8, 16


class TimeBlock(nn.Module):
    """A diffusion U-Net residual block: the time embedding is added inside the branch."""

    def __init__(self):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(4, C), nn.Conv2d(C, C, 3, padding=1, bias=False)
        self.time = nn.Linear(T, C, bias=False)
        self.norm2, self.conv2 = nn.GroupNorm(4, C), nn.Conv2d(C, C, 3, padding=1, bias=False)

    def forward(self, x, temb):
        h = self.conv1(torch.relu(self.norm1(x))) + self.time(torch.relu(temb))[:, :, None, None]
        return x + self.conv2(torch.relu(self.norm2(h)))


class TimeUNet(nn.Module):
    def __init__(self, blocks: int = 3):
        super().__init__()
        self.stem = nn.Conv2d(3, C, 3, padding=1, bias=False)
        self.time_mlp = nn.Sequential(nn.Linear(4, T, bias=False), nn.LayerNorm(T), nn.ReLU(),
                                      nn.Linear(T, T, bias=False))
        self.blocks = nn.ModuleList(TimeBlock() for _ in range(blocks))
        self.out_norm, self.out = nn.GroupNorm(4, C), nn.Conv2d(C, 3, 1)

    def forward(self, x, t):
        temb = self.time_mlp(t)
        h = self.stem(x)
        for block in self.blocks:
            h = block(h, temb)
        return self.out(torch.relu(self.out_norm(h)))


TIME_INPUTS = (torch.randn(2, 3, 8, 8), torch.randn(2, 4))


def test_time_embedding_add_is_no_skip(roles):
    report = gg.analyze(TimeUNet(), TIME_INPUTS, warn=False)
    got = roles(report)
    for b in range(3):  # the same roles in the first block (no common ancestor) as in the later ones
        assert got[f"blocks.{b}.norm1.weight"] == "merged"
        assert got[f"blocks.{b}.norm2.weight"] == "residual_last"
    assert got["time_mlp.1.weight"] == "merged"  # mixed into the features before norm2, no shortcut
    assert got["out_norm.weight"] == "head"
    # Only the blocks' own sums are residual: one per block, its skip the block's input.
    assert sorted(r.module_name for r in report.residual_adds) == ["blocks.0", "blocks.1", "blocks.2"]
    reason = next(e.reason for e in report.entries if e.param_name == "time_mlp.1.weight")
    assert "mixed with other features" in reason


def test_why_each_time_embedding_add_has_no_skip():
    flow = trace_model(TimeUNet(), TIME_INPUTS).flow
    why = {flow.flow.context(node): reason for node, reason in flow.sums.not_residual.items()}
    # block 0's operands share no ancestor; later, the embedding reached the stream through block 0
    assert why == {"blocks.0": "no fork", "blocks.1": "conditioning", "blocks.2": "conditioning"}


def test_time_embedding_roles_hold_numerically():
    checks = {c.param_name: c for c in gg.verify(TimeUNet(), TIME_INPUTS)}
    assert not [c for c in checks.values() if c.result == "fail"]
    for b in range(3):
        assert checks[f"blocks.{b}.norm1.weight"].result == "pass"  # doubling it changes norm2's output
        assert checks[f"blocks.{b}.norm2.weight"].result == "pass"  # zeroing it zeroes the branch
    assert checks["time_mlp.1.weight"].result == "pass"


class ClassBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm1, self.conv1 = nn.BatchNorm2d(C), nn.Conv2d(C, C, 3, padding=1, bias=False)
        self.norm2, self.conv2 = nn.BatchNorm2d(C), nn.Conv2d(C, C, 3, padding=1, bias=False)

    def forward(self, x, emb):
        h = self.conv1(torch.relu(self.norm1(x))) + emb[:, :, None, None]
        return x + self.conv2(torch.relu(self.norm2(h)))


class ClassConditioned(nn.Module):
    """One embedding of the class label (an integer input), added in every block."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, C, 3, padding=1, bias=False)
        self.label = nn.Embedding(10, C)
        self.blocks = nn.ModuleList(ClassBlock() for _ in range(3))
        self.head = nn.Linear(C, 10)

    def forward(self, x, y):
        emb = self.label(y)
        h = self.stem(x)
        for block in self.blocks:
            h = block(h, emb)
        return self.head(h.mean((2, 3)))


def test_class_embedding_add_is_no_skip(roles):
    model = ClassConditioned()
    inputs = (torch.randn(4, 3, 8, 8), torch.tensor([1, 2, 3, 4]))
    got = roles(gg.analyze(model, inputs, warn=False))
    assert {got[f"blocks.{b}.norm1.weight"] for b in range(3)} == {"merged"}
    assert {got[f"blocks.{b}.norm2.weight"] for b in range(3)} == {"residual_last"}
    assert not [c for c in gg.verify(model, inputs) if c.result == "fail"]


class FiLMBlock(nn.Module):
    """FiLM: the condition scales and shifts the features after norm2, inside the branch."""

    def __init__(self):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(4, C), nn.Conv2d(C, C, 3, padding=1, bias=False)
        self.norm2, self.conv2 = nn.GroupNorm(4, C), nn.Conv2d(C, C, 3, padding=1, bias=False)
        self.film = nn.Linear(T, 2 * C, bias=False)

    def forward(self, x, cond):
        scale, shift = self.film(cond)[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(self.conv1(torch.relu(self.norm1(x)))) * (1 + scale) + shift
        return x + self.conv2(torch.relu(h))


class FiLMNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, C, 3, padding=1, bias=False)
        self.cond = nn.Sequential(nn.Linear(4, T, bias=False), nn.LayerNorm(T), nn.ReLU())
        self.blocks = nn.ModuleList(FiLMBlock() for _ in range(3))
        self.head = nn.Linear(C, 10)

    def forward(self, x, c):
        cond = self.cond(c)
        h = self.stem(x)
        for block in self.blocks:
            h = block(h, cond)
        return self.head(h.mean((2, 3)))


def test_film_shift_is_no_skip(roles):
    model = FiLMNet()
    inputs = (torch.randn(2, 3, 8, 8), torch.randn(2, 4))
    report = gg.analyze(model, inputs, warn=False)
    got = roles(report)
    assert {got[f"blocks.{b}.norm1.weight"] for b in range(3)} == {"scale_invariant"}
    assert {got[f"blocks.{b}.norm2.weight"] for b in range(3)} == {"residual_last"}
    # The condition's norm modulates the branches, never the skip.
    assert got["cond.1.weight"] == "residual_last"
    assert len(report.residual_adds) == 3
    assert not [c for c in gg.verify(model, inputs) if c.result == "fail"]


class TimeBlockAddedAtTheEnd(TimeBlock):
    """The same block, with a second time projection added in the residual sum itself."""

    def __init__(self):
        super().__init__()
        self.time2 = nn.Linear(T, C, bias=False)

    def forward(self, x, temb):
        h = self.conv1(torch.relu(self.norm1(x))) + self.time(torch.relu(temb))[:, :, None, None]
        return x + self.conv2(torch.relu(self.norm2(h))) + self.time2(temb)[:, :, None, None]


class StemFirstTimeUNet(TimeUNet):
    """The stem runs before the time MLP: the image's fork is no longer the nearer one."""

    def forward(self, x, t):
        h = self.stem(x)
        temb = self.time_mlp(t)
        for block in self.blocks:
            h = block(h, temb)
        return self.out(torch.relu(self.out_norm(h)))


@pytest.mark.parametrize("unet", [TimeUNet, StemFirstTimeUNet])
def test_an_embedding_added_in_the_residual_sum_is_never_its_skip(roles, unet):
    """Block 0's sum of x, its branch and an embedding of the other input has no common ancestor:
    the embedding is set aside and the sum is residual (it once was "no fork", and later sums then
    counted from the wrong stream)."""
    model = unet()
    model.blocks = nn.ModuleList(TimeBlockAddedAtTheEnd() for _ in range(3))
    got = roles(gg.analyze(model, TIME_INPUTS, warn=False))
    assert [got[f"blocks.{b}.norm2.weight"] for b in range(3)] == ["residual_last"] * 3
    sums = trace_model(model, TIME_INPUTS).flow.sums
    assert sorted(sums.not_residual.values()) == ["conditioning"] * 2 + [
        "no fork"]  # the time adds inside the branches (block 0's: no common ancestor)
    # Each block's skip is its input itself (the stem's output, then the sum before), never the time
    # embedding the sum also adds.
    first = sums.sums[0]
    assert first.operands[first.skip].sources == (first.fork,)
    assert [s.operands[s.skip].sources for s in sums.sums[1:]] == [(s.node,) for s in sums.sums[:-1]]
