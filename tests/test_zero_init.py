"""``gg.zero_init``: the zero-γ trick (Goyal et al. 2017) for any architecture."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gammaguide as gg
from gammaguide.analysis import residual_variances
from gammaguide.models import BasicBlock, create_model

torchvision = pytest.importorskip("torchvision")


def zeroed_gammas(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if n.endswith("weight") and p.ndim == 1 and not p.any()}


def assert_blocks_pass_their_skip_through(model: nn.Module, block_type: type, skip_attr: str, x: torch.Tensor):
    """Each post-activation block computes relu(branch + skip); with the branch off it must
    compute exactly relu(skip(x)), in train mode (batch statistics) as at the start of training."""
    seen = []

    def check(block, args, out):
        skip = getattr(block, skip_attr)
        inp = args[0]
        expected = torch.relu(skip(inp) if skip is not None else inp)
        seen.append(torch.equal(out, expected))

    handles = [m.register_forward_hook(check) for m in model.modules() if isinstance(m, block_type)]
    with torch.no_grad():
        model.train()(x)
    for h in handles:
        h.remove()
    assert seen and all(seen), seen


def test_resnet20_blocks_become_identities_on_their_branch():
    model = create_model("resnet20")
    before = {n: p.clone() for n, p in model.named_parameters()}
    names = gg.zero_init(model, torch.randn(1, 3, 32, 32))
    assert sorted(names) == sorted(f"layers.{s}.{b}.bn2.weight" for s in range(3) for b in range(3))
    # Only those γ changed: β, shortcut and stem γ keep their values.
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == set(names)
    assert_blocks_pass_their_skip_through(model, BasicBlock, "shortcut", torch.randn(2, 3, 32, 32))
    adds = residual_variances(model, torch.randn(2, 3, 32, 32))
    assert len(adds) == 9 and all(a.branch_var == 0 and a.skip_var > 0 for a in adds)


def test_matches_torchvision_zero_init_residual_on_resnet50():
    from torchvision.models.resnet import Bottleneck

    model = torchvision.models.resnet50()
    names = gg.zero_init(model, torch.randn(1, 3, 64, 64))
    assert set(names) == zeroed_gammas(torchvision.models.resnet50(zero_init_residual=True))
    assert len(names) == 16
    assert_blocks_pass_their_skip_through(model, Bottleneck, "downsample", torch.randn(2, 3, 64, 64))


def test_matches_timm_zero_init_last():
    timm = pytest.importorskip("timm")
    model = timm.create_model("resnet18", zero_init_last=False)
    assert not zeroed_gammas(model)
    names = gg.zero_init(model, torch.randn(1, 3, 64, 64))
    assert set(names) == zeroed_gammas(timm.create_model("resnet18")) and len(names) == 8


def test_pre_ln_transformer_becomes_its_embedding_then_final_norm():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    model = transformers.LlamaModel(config).eval()
    ids = torch.randint(0, 100, (2, 8))
    names = gg.zero_init(model, {"input_ids": ids})
    assert sorted(names) == sorted(f"layers.{i}.{n}.weight" for i in range(2)
                                   for n in ("input_layernorm", "post_attention_layernorm"))
    with torch.no_grad():
        out = model(input_ids=ids).last_hidden_state
        expected = model.norm(model.embed_tokens(ids))
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    adds = residual_variances(model, {"input_ids": ids})
    assert len(adds) == 4 and all(a.branch_var == 0 for a in adds)


def test_other_roles_can_be_zeroed():
    model = create_model("resnet20")
    assert sorted(gg.zero_init(model, role="shortcut")) == ["layers.1.0.shortcut.1.weight",
                                                           "layers.2.0.shortcut.1.weight"]
    assert not model.layers[1][0].shortcut[1].weight.any()


def test_unknown_role_is_rejected():
    with pytest.raises(gg.GammaGuideError, match="unknown role 'last'.*residual_last"):
        gg.zero_init(create_model("resnet20"), role="last")


def test_no_gamma_of_that_role_warns_and_changes_nothing():
    model = create_model("preact_resnet18")
    before = [p.clone() for p in model.parameters()]
    with pytest.warns(UserWarning, match="no normalization scale of ResNet has role 'stream'"):
        assert gg.zero_init(model, role="stream") == []
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
