"""Roles on third-party architectures: torchvision, timm and Hugging Face (tiny configs, offline).

Spot checks derive the expected role of each γ from the architecture's own block classes;
the remaining architectures must trace without error and give every norm a role.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import gammaguide as gg

# Every test twice: analyze's default pass on meta tensors, and the real pass (conftest.py).
pytestmark = pytest.mark.usefixtures("forward_pass")

torchvision = pytest.importorskip("torchvision")
from torchvision.models import mobilenetv2, resnet as tv_resnet  # noqa: E402

AFFINE_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)
X64 = (1, 3, 64, 64)


def affine_norm_weights(model: nn.Module) -> set[str]:
    """Weights of every torch normalization module that has one (timm's fused ones included)."""
    return {
        f"{name}.weight" for name, m in model.named_modules()
        if isinstance(m, AFFINE_NORMS) and getattr(m, "weight", None) is not None
    }


def analyze_quiet(model: nn.Module, inputs) -> gg.Report:
    report = gg.analyze(model, inputs, warn=False)
    assert not report.warnings, report.warnings
    return report


def build(factory, *args, **kwargs) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # constructors' own deprecation notes
        return factory(*args, **kwargs)


# ----------------------------------------------------------------------------- torchvision ResNets


def tv_resnet_expected(model) -> dict[str, str]:
    """Bottleneck: bn1, bn2 scale_invariant, bn3 residual_last; BasicBlock: bn1 / bn2; the
    downsample's BN is the shortcut; the stem BN is the stream only when layer1.0 adds its
    input unchanged (resnet18), else every path from it is re-normalized (resnet50)."""
    exp = {}
    for name, block in model.named_modules():
        if isinstance(block, (tv_resnet.BasicBlock, tv_resnet.Bottleneck)):
            last = "bn3" if isinstance(block, tv_resnet.Bottleneck) else "bn2"
            for bn in ("bn1", "bn2", "bn3"):
                if hasattr(block, bn):
                    exp[f"{name}.{bn}.weight"] = "residual_last" if bn == last else "scale_invariant"
            if block.downsample is not None:
                exp[f"{name}.downsample.1.weight"] = "shortcut"
    exp["bn1.weight"] = "stream" if model.layer1[0].downsample is None else "scale_invariant"
    return exp


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "resnext50_32x4d", "wide_resnet50_2"])
def test_torchvision_resnet_family(name, roles):
    model = build(torchvision.models.get_model, name)
    report = analyze_quiet(model, torch.randn(*X64))
    exp = tv_resnet_expected(model)
    assert set(exp) == affine_norm_weights(model)
    assert roles(report) == exp


def test_stem_bn_stream_in_resnet18_but_scale_invariant_in_resnet50(roles):
    r18 = analyze_quiet(torchvision.models.resnet18(), torch.randn(*X64))
    r50 = analyze_quiet(torchvision.models.resnet50(), torch.randn(*X64))
    assert roles(r18)["bn1.weight"] == "stream"
    assert roles(r50)["bn1.weight"] == "scale_invariant"
    assert "layer1.0" in r18.entries[0].reason


def test_torchvision_resnet_uses_in_place_add():
    """torchvision's blocks write ``out += identity`` and ReLU(inplace=True): each block's add is found."""
    model = torchvision.models.resnet18()
    report = analyze_quiet(model, torch.randn(*X64))
    blocks = [n for n, m in model.named_modules() if isinstance(m, tv_resnet.BasicBlock)]
    assert sorted(r.module_name for r in report.residual_adds) == sorted(blocks)


def mobilenet_v2_expected(model) -> dict[str, str]:
    """In an inverted residual block, the BNs followed by a conv are scale_invariant; the last
    (projection) BN is residual_last if the block adds its input; otherwise its output is the
    next block's input: the stream if that block adds it back, else re-normalized. The last
    feature BN feeds the classifier (head)."""
    blocks = [(i, m) for i, m in enumerate(model.features) if isinstance(m, mobilenetv2.InvertedResidual)]
    exp = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            exp[f"{name}.weight"] = "scale_invariant"
    for k, (i, block) in enumerate(blocks):
        project = f"features.{i}.conv.{len(block.conv) - 1}.weight"
        nxt = blocks[k + 1][1] if k + 1 < len(blocks) else None
        if block.use_res_connect:
            exp[project] = "residual_last"
        elif nxt is not None and nxt.use_res_connect:
            exp[project] = "stream"
    exp[f"features.{len(model.features) - 1}.1.weight"] = "head"
    return exp


def test_mobilenet_v2(roles):
    model = torchvision.models.mobilenet_v2()
    report = analyze_quiet(model, torch.randn(*X64))
    assert roles(report) == mobilenet_v2_expected(model)


# ----------------------------------------------------------------------------- other torchvision


def _tv(name, **kw):
    return lambda: build(torchvision.models.get_model, name, **kw)


def _final_norm(model: nn.Module) -> str:
    """The norm nearest the classifier, by registration order (all these models register it last)."""
    return sorted(affine_norm_weights(model), key=list(dict(model.named_parameters())).index)[-1]


# (factory, input shape, block norms that must be residual_last: (block class, attribute names))
OTHER_TV = {
    "efficientnet_b0": (_tv("efficientnet_b0"), X64, None),
    "densenet121": (_tv("densenet121"), X64, None),
    "convnext_tiny": (_tv("convnext_tiny"), X64, ("CNBlock", ("block.2",))),
    "vit_b_16": (_tv("vit_b_16", image_size=64), X64, ("EncoderBlock", ("ln_1", "ln_2"))),
    "swin_t": (_tv("swin_t"), X64, ("SwinTransformerBlock", ("norm1", "norm2"))),
}


@pytest.mark.parametrize("name", list(OTHER_TV))
def test_other_torchvision_architectures_trace(name, roles):
    factory, shape, branch_norms = OTHER_TV[name]
    model = factory()
    report = analyze_quiet(model, torch.randn(*shape))
    got = roles(report)
    assert set(got) == affine_norm_weights(model)
    assert "unused" not in got.values()
    assert got[_final_norm(model)] == "head"
    if branch_norms is not None:
        cls, attrs = branch_norms
        blocks = [n for n, m in model.named_modules() if type(m).__name__ == cls]
        assert blocks
        assert {got[f"{b}.{a}.weight"] for b in blocks for a in attrs} == {"residual_last"}


def test_densenet_concatenates_so_nothing_is_residual(roles):
    model = torchvision.models.densenet121()
    report = analyze_quiet(model, torch.randn(*X64))
    assert report.residual_adds == ()
    final = _final_norm(model)
    assert {r for p, r in roles(report).items() if p != final} == {"scale_invariant"}


def test_torchvision_default_input_is_224():
    report = analyze_quiet(torchvision.models.resnet18(), None)
    assert report.input_shapes == ("args[0]: float32[1, 3, 224, 224]",)


# ----------------------------------------------------------------------------- timm


timm = pytest.importorskip("timm")


def timm_model(name, **kw):
    return build(timm.create_model, name, pretrained=False, **kw)


def test_timm_vit(roles):
    model = timm_model("vit_tiny_patch16_224", img_size=32, depth=2)
    report = analyze_quiet(model, torch.randn(1, 3, 32, 32))
    exp = {f"blocks.{i}.{n}.weight": "residual_last" for i in range(len(model.blocks)) for n in ("norm1", "norm2")}
    exp["norm.weight"] = "head"
    assert roles(report) == exp


def test_timm_resnetv2_batchnormact(roles):
    """Pre-activation bottlenecks with timm's fused BatchNormAct2d: norm1 feeds conv1 and, where
    the block projects, the shortcut conv; norm2 feeds conv2 -> norm3; norm3 ends the branch."""
    model = timm_model("resnetv2_50")
    report = analyze_quiet(model, torch.randn(*X64))
    exp = {"norm.weight": "head"}
    for name, block in model.named_modules():
        if type(block).__name__ == "PreActBottleneck":
            exp[f"{name}.norm1.weight"] = "shortcut" if block.downsample is not None else "scale_invariant"
            exp[f"{name}.norm2.weight"] = "scale_invariant"
            exp[f"{name}.norm3.weight"] = "residual_last"
    assert roles(report) == exp
    assert {e.norm_type for e in report.entries} == {"BatchNormAct2d"}


def test_timm_resnet(roles):
    model = timm_model("resnet18")
    got = roles(analyze_quiet(model, torch.randn(*X64)))
    assert got["bn1.weight"] == "stream"
    for name, block in model.named_modules():
        if type(block).__name__ == "BasicBlock":
            assert (got[f"{name}.bn1.weight"], got[f"{name}.bn2.weight"]) == ("scale_invariant", "residual_last")
            if block.downsample is not None:
                assert got[f"{name}.downsample.1.weight"] == "shortcut"


def test_timm_convnext_layer_scale_listed_apart(roles):
    model = timm_model("convnext_atto")
    report = analyze_quiet(model, torch.randn(*X64))
    got = roles(report)
    blocks = [n for n, m in model.named_modules() if type(m).__name__ == "ConvNeXtBlock"]
    assert {got[f"{b}.norm.weight"] for b in blocks} == {"residual_last"}
    assert got["stem.1.weight"] == "stream"
    assert got["head.norm.weight"] == "head"
    assert {p.name for p in report.others} == {f"{b}.gamma" for b in blocks}
    assert not any(p.decay for p in report.others)


def test_timm_default_input_from_pretrained_cfg():
    model = timm_model("resnet18")
    size = model.pretrained_cfg["input_size"]
    report = analyze_quiet(model, None)
    assert report.input_shapes == (f"args[0]: float32[1, {', '.join(map(str, size))}]",)


# ----------------------------------------------------------------------------- Hugging Face


transformers = pytest.importorskip("transformers")
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=128)


def hf_model(config_cls, model_cls, **kw):
    transformers.utils.logging.set_verbosity_error()
    config = getattr(transformers, config_cls)(**kw)
    return build(getattr(transformers, model_cls), config).eval()


def ids(n: int = 12) -> torch.Tensor:
    return torch.randint(0, TINY["vocab_size"], (2, n))


def test_bert_post_ln_norms_are_the_stream(roles):
    """Post-LN: every LayerNorm's output is the next residual add's skip input, except the
    last one, which feeds the pooler and classifier (head)."""
    model = hf_model("BertConfig", "BertForSequenceClassification", **TINY)
    x = ids()
    report = analyze_quiet(model, {"input_ids": x, "attention_mask": torch.ones_like(x)})
    last = f"bert.encoder.layer.{model.config.num_hidden_layers - 1}.output.LayerNorm.weight"
    exp = {p: "stream" for p in affine_norm_weights(model)}
    exp[last] = "head"
    assert roles(report) == exp
    assert len(exp) == 2 * model.config.num_hidden_layers + 1


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_pre_ln_decoders(kind, roles):
    if kind == "gpt2":
        model = hf_model("GPT2Config", "GPT2LMHeadModel", n_embd=32, n_layer=2, n_head=2, n_inner=64, vocab_size=128)
        block_norms, final = ("ln_1", "ln_2"), "transformer.ln_f"
        n_layers, norm_type = model.config.n_layer, "LayerNorm"
        prefix = "transformer.h"
    else:
        model = hf_model("LlamaConfig", "LlamaForCausalLM", num_key_value_heads=2, **TINY)
        block_norms, final, n_layers, norm_type = (
            ("input_layernorm", "post_attention_layernorm"), "model.norm", model.config.num_hidden_layers,
            "LlamaRMSNorm")
        prefix = "model.layers"
    report = analyze_quiet(model, {"input_ids": ids()})
    exp = {f"{prefix}.{i}.{n}.weight": "residual_last" for i in range(n_layers) for n in block_norms}
    exp[f"{final}.weight"] = "head"
    assert roles(report) == exp
    assert {e.norm_type for e in report.entries} == {norm_type}
    # Two residual adds per block: attention and MLP.
    assert len(report.residual_adds) == 2 * n_layers


# Decoders with q/k norms: the γ of a query or key norm scales the attention logits, so it sets
# the softmax's temperature over the values. A norm after the attention (OLMo 2's post-norm,
# Gemma 3's sandwich) cannot divide that out: merged. With the branch going straight to the
# residual add (Qwen 3) it ends the branch. Gemma 3's input norm reaches the logits only through
# the q/k norms and the values through its post-attention norm: scale_invariant.
QK_NORMS = {
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {"self_attn.q_norm": "merged", "self_attn.k_norm": "merged",
                                                  "post_attention_layernorm": "residual_last",
                                                  "post_feedforward_layernorm": "residual_last"}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {
        "self_attn.q_norm": "merged", "self_attn.k_norm": "merged", "input_layernorm": "scale_invariant",
        "post_attention_layernorm": "residual_last", "pre_feedforward_layernorm": "scale_invariant",
        "post_feedforward_layernorm": "residual_last"}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"self_attn.q_norm": "residual_last",
                                                  "self_attn.k_norm": "residual_last",
                                                  "input_layernorm": "residual_last",
                                                  "post_attention_layernorm": "residual_last"}),
}


@pytest.mark.parametrize("kind", sorted(QK_NORMS))
def test_query_and_key_norms_set_the_attention_temperature(kind, roles):
    config, cls, block = QK_NORMS[kind]
    if not hasattr(transformers, cls):
        pytest.skip(f"transformers {transformers.__version__} has no {cls}")
    model = hf_model(config, cls, num_key_value_heads=2, head_dim=16, **TINY)
    got = roles(analyze_quiet(model, {"input_ids": ids()}))
    exp = {f"model.layers.{i}.{n}.weight": role for i in range(TINY["num_hidden_layers"]) for n, role in block.items()}
    exp["model.norm.weight"] = "head"
    assert got == exp


def test_a_query_norm_gamma_is_not_divided_out_by_the_post_attention_norm():
    """What makes OLMo 2's q_norm merged, numerically: doubling its γ changes the output of the
    post-attention norm (a scale-invariant γ would leave it as it was)."""
    if not hasattr(transformers, "Olmo2ForCausalLM"):
        pytest.skip(f"transformers {transformers.__version__} has no Olmo2ForCausalLM")
    model = hf_model("Olmo2Config", "Olmo2ForCausalLM", num_key_value_heads=2, head_dim=16, **TINY)
    layer, x, seen = model.model.layers[0], ids(), []
    layer.post_attention_layernorm.register_forward_hook(lambda m, a, out: seen.append(out.detach().clone()))
    with torch.no_grad():
        model(input_ids=x)
        layer.self_attn.q_norm.weight.mul_(2)
        model(input_ids=x)
    assert (seen[1] - seen[0]).norm() > 1e-3 * seen[0].norm()
