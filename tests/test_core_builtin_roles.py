"""The role of every normalization scale in each built-in model.

Expectations are derived from the models' structure (which block a BN sits in and where),
independently of the tracer: a BasicBlock's bn1 feeds conv2 -> bn2 (scale_invariant), its bn2
ends the branch (residual_last), a projection shortcut ends in a BN (shortcut), the stem BN is
the stream when the first block adds its input unchanged, and a pre-activation net's final BN
feeds the classifier (head).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gammaguide as gg
from gammaguide import models
from gammaguide.models import BasicBlock, Bottleneck, PreActBlock

# Every test twice: analyze's default pass on meta tensors, and the real pass (conftest.py).
pytestmark = pytest.mark.usefixtures("forward_pass")

GUIDELINE_DECAY = {"residual_last", "scale_invariant"}
# The paper's categories (Kim et al., Table 1) and what the evidence of each role must say, written
# out here rather than read from gammaguide.
PAPER = {"residual_last": "last", "scale_invariant": "others", "shortcut": "down", "stream": "first", "head": None}
EVIDENCE = {
    "residual_last": "reaches the residual add in {block} on the branch side",
    "scale_invariant": "every path meets another normalization first",
    "shortcut": "lies inside the skip path of the residual add in {block}",
    "stream": "its output is the skip (identity) input of the residual add in {block}",
    "head": "reaches the model output",
}


def expected_roles(model: models.ResNet) -> dict[str, str]:
    exp: dict[str, str] = {}
    blocks = [(name, m) for name, m in model.named_modules() if isinstance(m, (BasicBlock, Bottleneck, PreActBlock))]
    for name, block in blocks:
        norms = [n for n, m in block.named_children() if isinstance(m, nn.BatchNorm2d)]
        if isinstance(block, PreActBlock):
            # bn1 -> conv1 -> bn2 (and -> projection conv -> its BN); bn2 -> conv2 -> add.
            exp[f"{name}.bn1.weight"] = "scale_invariant"
            exp[f"{name}.bn2.weight"] = "residual_last"
        else:
            *inner, last = sorted(norms)
            exp.update({f"{name}.{n}.weight": "scale_invariant" for n in inner})
            exp[f"{name}.{last}.weight"] = "residual_last"
        if block.shortcut is not None:
            exp[f"{name}.shortcut.1.weight"] = "shortcut"
    if model.bn1 is not None:
        first = blocks[0][1]
        exp["bn1.weight"] = "stream" if first.shortcut is None else "scale_invariant"
    if model.bn_final is not None:
        exp["bn_final.weight"] = "head"
    return exp


@pytest.fixture(scope="module")
def reports():
    """Each built-in model analyzed once, on a 32x32 batch of two."""
    x = torch.randn(2, 3, 32, 32)
    out = {}
    for name in models.list_models():
        model = models.create_model(name)
        out[name] = (model, gg.analyze(model, x))
    return out


@pytest.mark.parametrize("name", models.list_models())
def test_every_gamma_has_its_structural_role(name, reports, roles):
    model, report = reports[name]
    exp = expected_roles(model)
    bn_weights = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    assert set(exp) == bn_weights, "the expectation must cover every BatchNorm"
    assert roles(report) == exp


@pytest.mark.parametrize("name", models.list_models())
def test_entry_fields_follow_role_and_guidelines(name, reports):
    model, report = reports[name]
    modules = dict(model.named_modules())
    exp = expected_roles(model)
    for e in report.entries:
        assert e.param_name == f"{e.module_name}.weight"
        assert e.norm_type == type(modules[e.module_name]).__name__ == "BatchNorm2d"
        assert e.role == exp[e.param_name]
        assert e.paper_category == PAPER[e.role]
        assert e.decay == (e.role in GUIDELINE_DECAY)
        # The block whose sum decides: the norm's own for a branch or a projection shortcut, the
        # first block for the stem.
        block = "layers.0.0" if e.role == "stream" else e.module_name.rsplit(".", 1)[0].removesuffix(".shortcut")
        assert e.reason.startswith(EVIDENCE[e.role].format(block=block)), (e.param_name, e.reason)


def test_resnet20_counts_match_he_et_al(reports):
    """ResNet-20 = 3 stages of (20 - 2) / 6 = 3 BasicBlocks; stages 2 and 3 change shape."""
    _, report = reports["resnet20"]
    blocks = 3 * (20 - 2) // 6
    assert report.counts() == {
        "stream": 1, "residual_last": blocks, "scale_invariant": blocks, "merged": 0, "shortcut": 2, "head": 0,
        "unused": 0,
    }


@pytest.mark.parametrize("depth", [20, 32, 56, 110])
def test_cifar_resnet_depth(depth, reports):
    _, report = reports[f"resnet{depth}"]
    n = (depth - 2) // 6
    assert report.counts()["residual_last"] == 3 * n
    assert len(report.residual_adds) == 3 * n


def test_paper_categories_present_in_every_non_preact_model(reports):
    """The built-ins exist so that every γ category of the paper can be ablated."""
    for name, (model, report) in reports.items():
        cats = {e.paper_category for e in report.entries}
        assert {"last", "others", "down"} <= cats, name
        if model.bn1 is not None and model.layers[0][0].shortcut is None:
            assert "first" in cats, name


def test_reasons_name_the_residual_block(reports):
    _, report = reports["resnet20"]
    for e in report.entries:
        block = e.module_name.rsplit(".", 1)[0]
        if e.role == "residual_last":
            assert f"residual add in {block}" in e.reason and "branch side" in e.reason
        if e.role == "shortcut":
            assert block.removesuffix(".shortcut") in e.reason


def test_default_input_is_the_models_32px_image():
    model = models.create_model("resnet20")
    report = gg.analyze(model)
    assert report.input_shapes == ("args[0]: float32[1, 3, 32, 32]",)


def test_num_classes_and_bad_arguments():
    assert models.create_model("resnet20", num_classes=7).fc.out_features == 7
    with pytest.raises(gg.GammaGuideError, match="resnet20"):
        models.create_model("resnet21")
    with pytest.raises(gg.GammaGuideError, match="positive integer"):
        models.create_model("resnet20", num_classes=0)
    with pytest.raises(gg.GammaGuideError, match="6n\\+2"):
        models.cifar_resnet(21)
