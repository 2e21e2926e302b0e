"""gg.verify as an oracle (issue 9, section 4): checks that cannot mean anything say so, each
branch of a sum of several is checked on its own, and every role claim with a numerical check
passes it on every model the test suite analyzes (``test_verify_over_the_whole_zoo``)."""

from __future__ import annotations

import time
import warnings

import pytest
import torch
from torch import nn

import gammaguide as gg
from gammaguide import models

D = 8


def conv_bn(cin: int, cout: int, k: int = 3) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout))


def by_name(checks) -> dict[str, gg.Check]:
    return {c.param_name: c for c in checks}


def test_each_branch_of_a_sum_of_several_is_checked_on_its_own():
    """Zeroing one branch's γ cannot zero ``h + f(h) + g(h)``; it zeroes ``f(h)``."""
    from test_core_sums import ThreeWay

    checks = by_name(gg.verify(ThreeWay("h + f + g"), torch.randn(2, 3, 8, 8)))
    for i in range(2):
        for name in (f"f2.{i}.1.weight", f"g.{i}.1.weight"):
            assert (checks[name].role, checks[name].result) == ("residual_last", "pass"), checks[name]


class Tiny(nn.Module):
    """Activations far below BatchNorm's eps: eps, not the data, would set the scale."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = conv_bn(3, D), conv_bn(D, D), conv_bn(D, D)
        with torch.no_grad():
            for conv in (self.b[0], self.c[0]):
                conv.weight.mul_(1e-4)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x))))).mean((2, 3))


def test_eps_does_not_decide_the_check():
    """With eps in place doubling ``a``'s γ changes ``b``'s output by a third; verify's copy
    removes eps, so the check tests the architecture, not eps."""
    model, x = Tiny(), torch.randn(2, 3, 4, 4)
    with torch.no_grad():  # what the check would see with eps: the next norm's output moves
        probe = model.train()
        before = probe.b(torch.relu(probe.a(x)))
        probe.a[1].weight.mul_(2)
        probe.a[1].bias.mul_(2)
        after = probe.b(torch.relu(probe.a(x)))
        probe.a[1].weight.div_(2)
        probe.a[1].bias.div_(2)
    assert float((after - before).norm() / before.norm()) > 1e-2
    checks = by_name(gg.verify(model.eval(), x))
    assert (checks["a.1.weight"].role, checks["a.1.weight"].result) == ("scale_invariant", "pass")
    assert (checks["b.1.weight"].role, checks["b.1.weight"].result) == ("scale_invariant", "pass")
    assert model.b[1].eps == 1e-5  # the model itself keeps its eps


def test_one_value_per_channel_is_not_applicable_with_a_size_that_works():
    model = nn.Sequential(nn.Linear(4, D), nn.BatchNorm1d(D), nn.ReLU(), nn.Linear(D, D, bias=False), nn.BatchNorm1d(D))
    checks = gg.verify(model, torch.randn(1, 4))
    assert {c.result for c in checks} == {"not_applicable"}
    assert all("one value per channel" in c.detail and "float32[2, 4]" in c.detail for c in checks)
    assert {c.result for c in gg.verify(model, torch.randn(2, 4))} == {"pass", "not_applicable"}


def test_without_inputs_verify_draws_random_images():
    """A zero image gives every norm constant channels, where no check can show anything."""
    checks = gg.verify(models.create_model("resnet20"))
    assert {c.result for c in checks if c.role in ("scale_invariant", "residual_last")} == {"pass"}


def test_merged_gammas_are_shown_not_to_be_scale_invariant():
    from test_core_channels import UNet

    checks = by_name(gg.verify(UNet(), torch.randn(2, 3, 8, 8)))
    assert checks["enc.1.weight"].result == "pass" and "changed the output" in checks["enc.1.weight"].detail


# ----------------------------------------------------------------------------- the zoo


IMG = (2, 3, 32, 32)  # the documented input size for ImageNet models (see docs/core.md)
CIFAR = (2, 3, 8, 8)  # and for the built-in CIFAR models


def _image(shape=IMG):
    return lambda: torch.randn(*shape)


def _ids():
    return {"input_ids": torch.randint(0, 128, (2, 12))}


def _zoo():
    """(name, factory, inputs): every model the test suite analyzes, small."""
    out = [(f"builtin:{n}", (lambda n=n: models.create_model(n)), _image(CIFAR)) for n in models.list_models()]
    torchvision = pytest.importorskip("torchvision")
    tv = torchvision.models
    for n in ["resnet18", "resnet50", "resnext50_32x4d", "wide_resnet50_2", "mobilenet_v2", "efficientnet_b0",
              "densenet121", "convnext_tiny", "swin_t", "shufflenet_v2_x1_0"]:
        out.append((f"torchvision:{n}", lambda n=n: tv.get_model(n), _image()))
    out.append(("torchvision:vit_b_16", lambda: tv.vit_b_16(image_size=32), _image()))
    out.append(("torchvision:lraspp", lambda: tv.segmentation.lraspp_mobilenet_v3_large(
        weights_backbone=None, num_classes=5), _image()))
    timm = pytest.importorskip("timm")
    for n, kw, shape in [
        ("vit_tiny_patch16_224", dict(img_size=32, depth=2), IMG), ("resnetv2_50", {}, IMG), ("resnet18", {}, IMG),
        ("convnext_atto", {}, IMG), ("convnext_tiny", {}, IMG), ("convnextv2_atto", {}, IMG),
        ("beit_base_patch16_224", dict(img_size=32, depth=2), IMG),
        ("eva02_tiny_patch14_224", dict(img_size=28), (2, 3, 28, 28)),
        ("swinv2_tiny_window8_256", dict(img_size=64, window_size=4), (2, 3, 64, 64)),
        ("cait_xxs24_224", dict(img_size=32, depth=2), IMG), ("levit_128s", dict(img_size=64), (2, 3, 64, 64)),
        ("hrnet_w18_small", {}, IMG), ("mobilenetv3_small_100", {}, IMG), ("dpn68", {}, IMG),
        ("sequencer2d_s", dict(img_size=32), IMG),
    ]:
        out.append((f"timm:{n}", lambda n=n, kw=kw: timm.create_model(n, num_classes=10, **kw), _image(shape)))
    from timm.models import vision_transformer as vt

    for block in ("ParallelThingsBlock", "ParallelScalingBlock"):
        out.append((f"timm:{block}", lambda block=block: vt.VisionTransformer(
            img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=4,
            block_fn=getattr(vt, block), init_values=1e-5, qk_norm=block == "ParallelScalingBlock"), _image()))
    transformers = pytest.importorskip("transformers")
    transformers.utils.logging.set_verbosity_error()
    from test_core_meta_pass import HF_PARITY, TINY  # the families the meta-pass tests build, same configs

    def hf(config, cls, **kw):
        return lambda: getattr(transformers, cls)(getattr(transformers, config)(**kw))

    for config, cls, kw in [
        ("BertConfig", "BertForSequenceClassification", TINY),
        ("GPT2Config", "GPT2LMHeadModel", dict(n_embd=32, n_layer=2, n_head=2, n_inner=64, vocab_size=128)),
        ("LlamaConfig", "LlamaForCausalLM", dict(TINY, num_key_value_heads=2)),
        ("GPTJConfig", "GPTJForCausalLM", dict(n_embd=32, n_layer=2, n_head=2, vocab_size=128, rotary_dim=8)),
        ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(TINY, use_parallel_residual=True)),
        ("FalconConfig", "FalconForCausalLM", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                   vocab_size=128, new_decoder_architecture=True)),
        ("PhiConfig", "PhiForCausalLM", TINY),
        *HF_PARITY,
    ]:
        out.append((f"hf:{cls}", hf(config, cls, **kw), _ids))
    # The suite's own modules that exercise sums and channel routing.
    from test_core_channels import ConcatNorm, DualPath, Routed, Shuffled, Tokens, UNet
    from test_core_sums import Parallel, Spelled, ThreeWay, TwoHeads

    small = _image((2, 3, 8, 8))
    out += [
        ("suite:ThreeWay", lambda: ThreeWay("out = f; out += g; out += h"), small),
        ("suite:Parallel", lambda: nn.Sequential(Parallel("mlp + x + attn", True, True), nn.LayerNorm(D)),
         lambda: torch.randn(2, 5, D)),
        ("suite:TwoHeads", TwoHeads, small), ("suite:Spelled", lambda: Spelled("x.addcmul(b, t)"), small),
        ("suite:Routed", lambda: Routed("chunk"), small), ("suite:DualPath", DualPath, small),
        ("suite:ConcatNorm", lambda: ConcatNorm("group4", False), small), ("suite:UNet", UNet, small),
        ("suite:Shuffled", lambda: Shuffled("view-transpose"), small), ("suite:Tokens", Tokens,
                                                                          lambda: torch.randn(2, 5, D)),
    ]
    return out


# What a check may answer instead of a number, and why.
ALLOWED = ("no numerical check for role", "not positively homogeneous", "branch does not map zero to zero",
           "its features are mixed with others before the sum", "a lerp adds")


def test_verify_over_the_whole_zoo():
    """Every role claim with a numerical check passes it, on every model the suite analyzes, at
    the sizes above. Prints the time each model takes and the totals."""
    totals = {"pass": 0, "fail": 0, "not_applicable": 0}
    failures, start = [], time.perf_counter()
    for name, factory, inputs in _zoo():
        torch.manual_seed(0)
        t = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            checks = gg.verify(factory(), inputs())
        for c in checks:
            totals[c.result] += 1
            if c.result == "fail" or (c.result == "not_applicable" and not c.detail.startswith(ALLOWED)):
                failures.append((name, c))
        print(f"{name:40s} {time.perf_counter() - t:6.1f}s {len(checks):4d} checks")
    print(f"zoo: {totals}, {time.perf_counter() - start:.0f}s")
    assert not failures, failures
    assert totals["pass"] > 1000
