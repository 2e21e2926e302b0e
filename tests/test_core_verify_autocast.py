"""verify inside a caller's autocast region: the same results as outside it.

Its checks compare exact zeros and small ratios, so it runs in full precision whatever autocast
region it is called in (an autocast region also caches weight casts from one pass to the next,
so that the passes' ops no longer line up); the model and the region are left as they were."""

from __future__ import annotations

import torch

import gammaguide as gg
from gammaguide.models import create_model


def test_verify_under_autocast_matches_outside():
    model, x = create_model("resnet20"), torch.randn(4, 3, 8, 8)
    outside = [(c.param_name, c.role, c.result) for c in gg.verify(model, x)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = [(c.param_name, c.role, c.result) for c in gg.verify(model, x)]
        assert torch.is_autocast_enabled("cpu")  # the caller's region is still on
        assert model.conv1(x).dtype == torch.bfloat16
    assert inside == outside
    assert {r for _, role, r in outside if role in ("residual_last", "scale_invariant")} == {"pass"}
