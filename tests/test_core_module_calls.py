"""Module calls in the trace (trace._module_calls): where each begins and ends, and nothing left behind."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gammaguide as gg
from gammaguide.analysis import trace_model
from gammaguide.errors import GammaGuideError


class Flaky(nn.Module):
    """Raises after running its linear layer; its parent catches that and falls back."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        self.lin(x)
        raise ValueError("not today")


class Catches(nn.Module):
    def __init__(self):
        super().__init__()
        self.flaky = Flaky()
        self.norm = nn.LayerNorm(4)

    def forward(self, x):
        try:
            x = self.flaky(x)
        except ValueError:
            x = x * 2  # run by Catches itself, after Flaky's call ended with an exception
        return self.norm(x)


@pytest.mark.parametrize("on_meta", [True, False])
def test_a_call_that_raises_inside_the_model_ends_there(on_meta):
    model = Catches()
    g = trace_model(model, torch.ones(2, 4), on_meta=on_meta).graph
    names = {c.name: i for i, c in enumerate(g.calls)}
    flaky = g.calls[names["flaky"]]
    assert flaky.end > flaky.start  # closed, and it ran the linear layer
    doubling = [i for i, op in enumerate(g.ops) if not isinstance(op, str) and op.__name__.startswith("mul")]
    assert doubling and all(g.call[i] == names[""] for i in doubling)  # the fallback is the parent's
    assert g.calls[names["norm"]].parent == names[""]


def test_ops_run_by_a_modules_own_hooks_belong_to_its_call():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    model[0].register_forward_pre_hook(lambda m, args: (args[0] + 1,))
    model[0].register_forward_hook(lambda m, args, out: out * 3)
    g = trace_model(model, torch.ones(2, 4)).graph
    lin = next(i for i, c in enumerate(g.calls) if c.name == "0")
    ops = {op.__name__.split(".")[0] for i, op in enumerate(g.ops) if g.call[i] == lin and not isinstance(op, str)}
    assert {"add", "mul"} <= ops  # both hooks' ops, with the linear layer's


def test_call_impl_is_put_back_after_a_pass_and_after_a_failing_one():
    before = nn.Module.__dict__["_call_impl"]
    gg.analyze(nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)), torch.ones(2, 4), warn=False)
    assert nn.Module.__dict__["_call_impl"] is before

    class Fails(nn.Module):
        def forward(self, x):
            raise RuntimeError("broken forward")

    with pytest.raises(GammaGuideError, match="broken forward"):
        gg.analyze(Fails(), torch.ones(2, 4), warn=False)
    assert nn.Module.__dict__["_call_impl"] is before
    assert "_call_impl" not in vars(nn.Linear)  # nothing set on subclasses
