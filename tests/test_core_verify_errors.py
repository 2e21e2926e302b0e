"""gg.verify's numerical checks, and the GammaGuideError messages for bad inputs."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import gammaguide as gg
from gammaguide import models

X = torch.randn(4, 3, 32, 32)
D = 8


# ----------------------------------------------------------------------------- verify


def test_verify_resnet20():
    model = models.create_model("resnet20")
    report = gg.analyze(model, X)
    checks = gg.verify(model, X)
    assert [(c.param_name, c.role) for c in checks] == [(e.param_name, e.role) for e in report.entries]
    for c in checks:
        want = "pass" if c.role in ("scale_invariant", "residual_last") else "not_applicable"
        assert c.result == want, c
        assert c.detail


class BiasBeforeAdd(nn.Module):
    """Pre-LN block whose branch ends in a biased linear; a GELU between two BNs."""

    def __init__(self):
        super().__init__()
        self.norm, self.fc = nn.LayerNorm(D), nn.Linear(D, D, bias=True)
        self.conv1, self.bn1 = nn.Conv1d(D, D, 1, bias=False), nn.BatchNorm1d(D)
        self.conv2, self.bn2 = nn.Conv1d(D, D, 1, bias=False), nn.BatchNorm1d(D)
        self.head = nn.Linear(D, 2)

    def forward(self, x):  # x: (B, T, D)
        x = x + self.fc(self.norm(x))
        h = self.bn1(self.conv1(x.transpose(1, 2)))
        h = self.bn2(self.conv2(nn.functional.gelu(h)))
        return self.head(h.mean(-1))


def test_verify_not_applicable_cases():
    model = BiasBeforeAdd()
    x = torch.randn(4, 5, D)
    by_name = {c.param_name: c for c in gg.verify(model, x)}
    assert by_name["norm.weight"].role == "residual_last"
    assert by_name["norm.weight"].result == "not_applicable"
    assert "fc" in by_name["norm.weight"].detail  # the biased linear between the norm and the add
    assert by_name["bn1.weight"].role == "scale_invariant"
    assert by_name["bn1.weight"].result == "not_applicable"
    assert "gelu" in by_name["bn1.weight"].detail
    assert all(c.result in ("pass", "fail", "not_applicable") for c in by_name.values())


class OneNormTwoSums(nn.Module):
    """One BN ends the branches of two residual sums: through a bias-free 1x1 conv into the first,
    through ``second`` (with or without a bias) into the second."""

    def __init__(self, bias: bool):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.first, self.second = nn.Conv2d(4, 4, 1, bias=False), nn.Conv2d(4, 4, 1, bias=bias)
        if bias:
            nn.init.constant_(self.second.bias, 0.5)

    def forward(self, x):
        h = self.bn(self.conv(x))
        return x + self.first(h), x + self.second(h)


@pytest.mark.parametrize("bias", [False, True])
def test_verify_a_gamma_that_ends_the_branches_of_two_sums(bias):
    """Zeroing γ and β must zero its branch of every sum it ends: the largest of the branches
    counts. With a bias in the second branch only the first is zeroed, so nothing can be checked."""
    (check,) = gg.verify(OneNormTwoSums(bias), torch.randn(4, 4, 8, 8))
    assert (check.param_name, check.role) == ("bn.weight", "residual_last")
    if bias:
        assert check.result == "not_applicable", check
        assert check.detail == "branch does not map zero to zero: convolution with a bias in second"
    else:
        assert check.result == "pass", check
        assert check.detail == "zeroing γ and β zeroed its branch of 2 residual sum(s)"


def test_verify_refuses_meta_models():
    with torch.device("meta"):
        model = models.create_model("resnet20")
    with pytest.raises(gg.GammaGuideError, match="meta device"):
        gg.verify(model, torch.zeros(2, 3, 32, 32, device="meta"))


# ----------------------------------------------------------------------------- errors


def test_forward_failure_names_the_inputs_and_the_error():
    model = models.create_model("resnet20")
    with pytest.raises(gg.GammaGuideError) as info:
        gg.analyze(model, torch.randn(2, 5, 32, 32))
    msg = str(info.value)
    assert "float32[2, 5, 32, 32]" in msg and "RuntimeError" in msg and "channels" in msg
    assert "example_inputs" in msg  # what to try
    assert isinstance(info.value.__cause__, RuntimeError)


def test_forward_failure_with_keyword_inputs():
    class NeedsMask(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.norm = nn.Embedding(10, D), nn.LayerNorm(D)

        def forward(self, input_ids, attention_mask):
            return self.norm(self.emb(input_ids)) * attention_mask[..., None]

    with pytest.raises(gg.GammaGuideError, match=r"input_ids: int64\[1, 4\].*TypeError.*attention_mask"):
        gg.analyze(NeedsMask(), {"input_ids": torch.zeros(1, 4, dtype=torch.long)})


def no_norm_model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 30 * 30, 2))


def test_model_without_norms():
    model = no_norm_model()
    report = gg.analyze(model, X)
    assert report.entries == () and report.warnings == ()
    with pytest.warns(UserWarning, match="no normalization layers"):
        groups = gg.param_groups(model, 1e-4, X)
    decayed = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    assert decayed == {id(p) for p in model.parameters() if p.ndim >= 2}
    assert sorted(id(p) for g in groups for p in g["params"]) == sorted(id(p) for p in model.parameters())


@pytest.mark.parametrize("bad", ["images.png", 3, {1, 2}, None.__class__])
def test_example_inputs_of_the_wrong_type(bad):
    with pytest.raises(gg.GammaGuideError, match="tensor, a tuple of positional inputs or a dict"):
        gg.analyze(models.create_model("resnet20"), bad)


def test_keyword_inputs_need_string_keys():
    with pytest.raises(gg.GammaGuideError, match="string keys"):
        gg.analyze(models.create_model("resnet20"), {0: X})


@pytest.mark.parametrize("model", [
    nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)),
    nn.Sequential(nn.Embedding(10, 4), nn.LayerNorm(4)),
], ids=["linear", "embedding"])
def test_missing_example_inputs_for_a_non_image_model(model):
    with pytest.raises(gg.GammaGuideError, match="example_inputs is required.*input_ids"):
        gg.analyze(model)
    with pytest.raises(gg.GammaGuideError, match="example_inputs is required"):
        gg.param_groups(model, 1e-4)


def test_not_a_module():
    model = models.create_model("resnet20")
    with pytest.raises(gg.GammaGuideError, match="expected a torch.nn.Module.*OrderedDict"):
        gg.analyze(model.state_dict(), X)


def test_forward_returning_no_tensor():
    class Silent(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm2d(3)

        def forward(self, x):
            self.bn(x)

    with pytest.raises(gg.GammaGuideError, match="returned no tensor"):
        gg.analyze(Silent(), X)


def test_one_public_exception_type():
    assert issubclass(gg.GammaGuideError, Exception)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(gg.GammaGuideError):
            gg.param_groups(models.create_model("resnet20"), 1e-4, X, policy="bogus")
