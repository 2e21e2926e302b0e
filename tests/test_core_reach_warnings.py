"""Decisions that depend on the example input, or that one role hides, come with a warning.

A routed model reaches only the experts its example input picks: the others' γ are ``unused`` and
not decayed, which holds for that input only, so a warning names the modules not reached. One
normalization called at places of different roles (a LayerNorm used inside the blocks and again
before the head) takes the strongest role for all of them, as a γ shared by two normalizations
does, and is warned about in the same way."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gammaguide as gg

pytestmark = pytest.mark.usefixtures("forward_pass")

D = 8


class Expert(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm, self.fc = nn.LayerNorm(D), nn.Linear(D, D)

    def forward(self, x):
        return self.fc(self.norm(x))


class Routed(nn.Module):
    """Top-1 routing by value over a ModuleDict of experts, each a residual branch."""

    def __init__(self):
        super().__init__()
        self.router = nn.Linear(D, 4)
        self.experts = nn.ModuleDict({f"e{i}": Expert() for i in range(4)})
        self.norm, self.head = nn.LayerNorm(D), nn.Linear(D, 3)

    def forward(self, x):
        chosen = int(self.router(x.detach()).mean(0).argmax())
        x = x + self.experts[f"e{chosen}"](x)
        return self.head(self.norm(x))


def test_experts_not_reached_are_named():
    model = Routed()
    x = torch.randn(2, D)
    with pytest.warns(UserWarning, match="did not reach") as caught:
        report = gg.analyze(model, x)
    unused = sorted(e.module_name for e in report.entries if e.role == "unused")
    assert len(unused) == 3 and all(not e.decay for e in report.entries if e.role == "unused")
    message = next(str(w.message) for w in caught if "did not reach" in str(w.message))
    for name in unused:  # the experts themselves, not their norms, and not the ModuleDict
        assert name.removesuffix(".norm") in message
    assert "experts," not in message and "this example input only" in message
    assert sum("did not reach" in w for w in report.warnings) == 1


def test_every_module_reached_gives_no_warning():
    report = gg.analyze(nn.Sequential(Expert(), nn.LayerNorm(D)), torch.randn(2, D))
    assert not report.warnings


class ReusedNorm(nn.Module):
    """One LayerNorm before every block and before the head."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(D)
        self.blocks = nn.ModuleList(nn.Linear(D, D) for _ in range(2))
        self.head = nn.Linear(D, 3)

    def forward(self, x):
        for block in self.blocks:
            x = x + block(self.norm(x))
        return self.head(self.norm(x))


def test_norm_called_at_places_of_different_roles_warns(roles):
    with pytest.warns(UserWarning, match="called at 3 places whose outputs have different roles") as caught:
        report = gg.analyze(ReusedNorm(), torch.randn(2, D))
    assert roles(report) == {"norm.weight": "residual_last"}  # the strongest of residual_last and head
    message = next(str(w.message) for w in caught if "called at" in str(w.message))
    assert "residual_last" in message and "head" in message and "<model>" in message


def test_norm_called_twice_with_one_role_is_quiet():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm, self.fc1, self.fc2 = nn.LayerNorm(D), nn.Linear(D, D), nn.Linear(D, D)

        def forward(self, x):
            x = x + self.fc1(self.norm(x))
            return x + self.fc2(self.norm(x))

    report = gg.analyze(Twice(), torch.randn(2, D))
    assert not report.warnings and {e.role for e in report.entries} == {"residual_last"}
