"""Sums: roles that do not depend on how a sum is written (issue 9, sections 2 and 5).

A chain of additions is one sum; the operand that carries the stream is the skip and every other
operand is a branch; a sum of computed outputs with no skip (two classifier heads) is no residual
add. Every spelling of a residual add is found, or gives a warning."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gammaguide as gg
from gammaguide.analysis import trace_model

# Every test twice: analyze's default pass on meta tensors, and the real pass (conftest.py).
pytestmark = pytest.mark.usefixtures("forward_pass")

D = 8
IMAGE = torch.randn(2, 3, 8, 8)


def conv_bn(cin: int, cout: int, k: int = 3) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout))


# ----------------------------------------------------------------------------- one sum, three operands


def three_way(spelling: str, h: torch.Tensor, f: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``h + f + g`` written every way the issue names (and a few more)."""
    if spelling == "h + f + g":
        return h + f + g
    if spelling == "f + g + h":
        return f + g + h
    if spelling == "g + h + f":
        return g + h + f
    if spelling == "h + (f + g)":
        return h + (f + g)
    if spelling == "out = f; out += g; out += h":
        out = f
        out += g
        out += h
        return out
    if spelling == "out = h.clone(); out += f; out += g":
        out = h.clone()
        out += f
        out += g
        return out
    if spelling == "torch.add chain":
        return torch.add(torch.add(g, h), f)
    if spelling == "sum([...])":
        return sum([f, h, g])
    if spelling == "stack.sum":
        return torch.stack([g, f, h]).sum(0)
    if spelling == "h + stack([f, g]).sum(0)":
        return h + torch.stack([f, g]).sum(dim=0)
    raise AssertionError(spelling)


SPELLINGS = ["h + f + g", "f + g + h", "g + h + f", "h + (f + g)", "out = f; out += g; out += h",
             "out = h.clone(); out += f; out += g", "torch.add chain", "sum([...])", "stack.sum",
             "h + stack([f, g]).sum(0)"]


class ThreeWay(nn.Module):
    """stem -> h; f(h) = conv-BN-ReLU-conv-BN, g(h) = conv-BN; one sum of h, f(h), g(h); twice."""

    def __init__(self, spelling: str):
        super().__init__()
        self.spelling = spelling
        self.stem = conv_bn(3, D)
        self.f1, self.f2, self.g = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        for _ in range(2):
            self.f1.append(conv_bn(D, D))
            self.f2.append(conv_bn(D, D))
            self.g.append(conv_bn(D, D, 1))
        self.fc = nn.Linear(D, 2)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        for f1, f2, g in zip(self.f1, self.f2, self.g, strict=True):
            f = f2(torch.relu(f1(h)))
            h = torch.relu(three_way(self.spelling, h, f, g(h)))
        return self.fc(h.mean((2, 3)))


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_a_chain_of_additions_is_one_sum_whatever_the_order(spelling, roles):
    report = gg.analyze(ThreeWay(spelling), IMAGE)
    expected = {"stem.1.weight": "stream"}
    for i in range(2):
        expected.update({f"f1.{i}.1.weight": "scale_invariant", f"f2.{i}.1.weight": "residual_last",
                         f"g.{i}.1.weight": "residual_last"})
    assert roles(report) == expected
    assert [a.branches for a in report.residual_adds] == [2, 2]
    assert {a.skip_weighted for a in report.residual_adds} == {0}


class Parallel(nn.Module):
    """A parallel transformer block ``x + attn(ln(x)) + mlp(ln(x))`` (GPT-J, PaLM, ViT-22B), with
    one norm or two, with or without q/k norms, its sum written in ``order``."""

    def __init__(self, order: str, qk_norm: bool, two_norms: bool):
        super().__init__()
        self.order, self.qk_norm, self.two_norms = order, qk_norm, two_norms
        self.ln = nn.LayerNorm(D)
        self.ln2 = nn.LayerNorm(D) if two_norms else None
        self.q, self.k, self.v, self.proj = (nn.Linear(D, D) for _ in range(4))
        self.q_norm = nn.LayerNorm(D) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(D) if qk_norm else nn.Identity()
        self.mlp = nn.Sequential(nn.Linear(D, 2 * D), nn.GELU(), nn.Linear(2 * D, D))

    def forward(self, x):
        h = self.ln(x)
        q, k = self.q_norm(self.q(h)), self.k_norm(self.k(h))
        attn = self.proj(torch.softmax(q @ k.transpose(1, 2) / D ** 0.5, -1) @ self.v(h))
        mlp = self.mlp(self.ln2(x) if self.two_norms else h)
        if self.order == "x + attn + mlp":
            return x + attn + mlp
        if self.order == "attn + mlp + x":
            return attn + mlp + x
        return mlp + x + attn


@pytest.mark.parametrize("two_norms", [False, True], ids=["one_norm", "two_norms"])
@pytest.mark.parametrize("qk_norm", [False, True], ids=["plain", "qk_norm"])
@pytest.mark.parametrize("order", ["x + attn + mlp", "attn + mlp + x", "mlp + x + attn"])
def test_parallel_transformer_block_norms_end_branches_in_every_layer(order, qk_norm, two_norms, roles):
    model = nn.Sequential(*(Parallel(order, qk_norm, two_norms) for _ in range(3)), nn.LayerNorm(D), nn.Linear(D, 2))
    got = roles(gg.analyze(model, torch.randn(2, 5, D)))
    for i in range(3):
        norms = ["ln"] + (["ln2"] if two_norms else []) + (["q_norm", "k_norm"] if qk_norm else [])
        for n in norms:
            assert got[f"{i}.{n}.weight"] == "residual_last", (i, n)
    assert got["3.weight"] == "head"


transformers = pytest.importorskip("transformers")
TINY = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64, vocab_size=128)


def hf_model(config: str, cls: str, **kw) -> nn.Module:
    transformers.utils.logging.set_verbosity_error()
    return getattr(transformers, cls)(getattr(transformers, config)(**kw)).eval()


PARALLEL_HF = {
    "gptj": (lambda: hf_model("GPTJConfig", "GPTJForCausalLM", n_embd=32, n_layer=3, n_head=2, vocab_size=128,
                              rotary_dim=8), "transformer.h", ("ln_1",)),
    "gpt_neox": (lambda: hf_model("GPTNeoXConfig", "GPTNeoXForCausalLM", use_parallel_residual=True, **TINY),
                 "gpt_neox.layers", ("input_layernorm", "post_attention_layernorm")),
    "falcon": (lambda: hf_model("FalconConfig", "FalconForCausalLM", hidden_size=32, num_hidden_layers=3,
                                num_attention_heads=2, vocab_size=128, parallel_attn=True), "transformer.h",
               ("input_layernorm",)),
    "falcon_new_arch": (lambda: hf_model("FalconConfig", "FalconForCausalLM", hidden_size=32, num_hidden_layers=3,
                                         num_attention_heads=2, vocab_size=128, new_decoder_architecture=True),
                        "transformer.h", ("ln_attn", "ln_mlp")),
    "phi": (lambda: hf_model("PhiConfig", "PhiForCausalLM", **TINY), "model.layers", ("input_layernorm",)),
    "codegen": (lambda: hf_model("CodeGenConfig", "CodeGenForCausalLM", n_embd=32, n_layer=3, n_head=2,
                                 vocab_size=128, rotary_dim=8), "transformer.h", ("ln_1",)),
}


@pytest.mark.parametrize("family", list(PARALLEL_HF))
def test_hugging_face_parallel_residual_blocks(family, roles):
    factory, prefix, block_norms = PARALLEL_HF[family]
    model = factory()
    got = roles(gg.analyze(model, {"input_ids": torch.randint(0, 128, (2, 12))}, warn=False))
    layers = len(dict(model.named_modules())[prefix])
    for i in range(layers):
        for n in block_norms:
            assert got[f"{prefix}.{i}.{n}.weight"] == "residual_last", (i, n)
    assert list(got.values()).count("head") == 1


timm = pytest.importorskip("timm")


@pytest.mark.parametrize("block", ["ParallelThingsBlock", "ParallelScalingBlock"])
def test_timm_parallel_vit_blocks(block, roles):
    """timm's ``vit_small_patch16_18x2_224`` blocks (two attentions and two MLPs, each summed with
    ``torch.stack(...).sum(0)``) and ViT-22B-style blocks (one fused projection, q/k norms)."""
    from timm.models import vision_transformer as vt

    kw = dict(qk_norm=True) if block == "ParallelScalingBlock" else {}
    model = vt.VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, num_classes=4,
                                 block_fn=getattr(vt, block), init_values=1e-5, **kw)
    got = roles(gg.analyze(model, torch.randn(1, 3, 32, 32), warn=False))
    block_norms = {p: r for p, r in got.items() if p.startswith("blocks.")}
    assert block_norms and set(block_norms.values()) == {"residual_last"}
    assert got["norm.weight"] == "head"


# ----------------------------------------------------------------------------- sums that are no residual add


class TwoHeads(nn.Module):
    """A backbone and two classifier heads whose logits are added at the output."""

    def __init__(self):
        super().__init__()
        self.body = conv_bn(3, D)
        self.head1 = nn.Conv2d(D, 4, 1)
        self.head2 = nn.Sequential(nn.Conv2d(D, D, 3, padding=1, bias=False), nn.BatchNorm2d(D), nn.ReLU(),
                                   nn.Conv2d(D, 4, 1))

    def forward(self, x):
        f = torch.relu(self.body(x))
        return nn.functional.interpolate(self.head1(f) + self.head2(f), scale_factor=2.0)


def test_two_heads_added_at_the_output_are_no_residual_add(roles):
    report = gg.analyze(TwoHeads(), IMAGE)
    assert report.residual_adds == ()
    assert roles(report) == {"body.1.weight": "head", "head2.1.weight": "head"}


class Heads(nn.Module):
    """Two classifier heads on one backbone, their logits added, then ``after`` to the output: a sum
    of heads (no skip) only when nothing weighted, normalized or summed follows it."""

    def __init__(self, after):
        super().__init__()
        self.after = after
        self.body, self.norm = conv_bn(3, D), nn.BatchNorm2d(4)
        self.head1, self.lin = nn.Conv2d(D, 4, 1), nn.Conv2d(4, 4, 1)
        self.head2 = nn.Sequential(nn.Conv2d(D, D, 3, padding=1, bias=False), nn.BatchNorm2d(D), nn.ReLU(),
                                   nn.Conv2d(D, 4, 1))  # deeper than head1: no tie
        self.w = nn.Parameter(torch.randn(4, 4))

    def forward(self, x):
        f = torch.relu(self.body(x))
        return self.after(self, f)


def _added_then(model: nn.Module, f):
    t = model.head1(f) + model.head2(f)
    a = t.relu()
    return a * t, model.lin(a)  # a feeds the product and, after it, a conv


HEADS = {
    "returned as it is": (lambda m, f: m.head1(f) + m.head2(f), "heads"),
    "through a relu": (lambda m, f: torch.relu(m.head1(f) + m.head2(f)), "heads"),
    "then normalized": (lambda m, f: m.norm(m.head1(f) + m.head2(f)), "residual"),
    "then scaled and added to": (lambda m, f: (m.head1(f) + m.head2(f)) * 2 + f.mean(1, keepdim=True),
                                 "inside a branch"),
    "then into a conv, after a product": (_added_then, "residual"),
    "a head times a feature": (lambda m, f: m.head1(f) + m.head2(f) * f.mean(), "residual"),
    "then stacked": (lambda m, f: torch.stack([m.head1(f) + m.head2(f), m.head1(f)]), "residual"),
    # addmm adds the product f' @ w to its first argument: a linear layer's head, whatever f' is
    "addmm of a head and a product": (lambda m, f: torch.addmm(m.head1(f).mean((2, 3)), m.norm(m.head2(f)).mean((2, 3)),
                                                                m.w), "heads"),
}


@pytest.mark.parametrize("name", sorted(HEADS))
def test_a_sum_of_heads_reaches_the_output_with_nothing_weighted_in_between(name):
    after, expected = HEADS[name]
    sums = trace_model(Heads(after), IMAGE).flow.sums
    status = {s.node: "residual" for s in sums.residual()} | sums.not_residual
    assert status[min(status)] == expected  # the sum of the two heads' logits


def test_torchvision_lraspp_heads_are_heads(roles):
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.segmentation.lraspp_mobilenet_v3_large(weights_backbone=None, num_classes=5)
    report = gg.analyze(model, torch.randn(1, 3, 64, 64), warn=False)
    got = roles(report)
    assert got["classifier.cbr.1.weight"] == "head"
    assert got["backbone.16.1.weight"] == "head"  # the last backbone norm feeds the high classifier
    assert not any(a.module_name == "classifier" for a in report.residual_adds)


def test_equal_branches_with_no_skip_are_no_residual_add(roles):
    """``bn_a(conv_a(x)) + bn_b(conv_b(x))`` (RepVGG's blocks without identity): neither operand is
    the stream, and neither γ is scale-invariant alone: the other branch is added unscaled."""

    class TwoBranches(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.a, self.b, self.c = conv_bn(3, D), conv_bn(D, D), conv_bn(D, D, 1), conv_bn(D, D)

        def forward(self, x):
            h = torch.relu(self.stem(x))
            h = torch.relu(self.a(h) + self.b(h))
            return self.c(h).mean((2, 3))

    report = gg.analyze(TwoBranches(), IMAGE)
    assert report.residual_adds == ()
    assert list(trace_model(TwoBranches(), IMAGE).flow.sums.not_residual.values()) == ["tie"]
    assert roles(report) == {"stem.1.weight": "scale_invariant", "a.1.weight": "merged", "b.1.weight": "merged",
                             "c.1.weight": "head"}


# ----------------------------------------------------------------------------- residual adds in other spellings


def residual_spelling(spelling: str, x: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    if spelling == "x.addcmul(b, t)":
        return x.addcmul(b, t)
    if spelling == "torch.addcmul(x, b, t, value=0.5)":
        return torch.addcmul(x, b, t, value=0.5)
    if spelling == "torch.stack([x, b]).sum(0)":
        return torch.stack([x, b]).sum(0)
    if spelling == "torch.stack([x, b], 1).mean(1)":
        return torch.stack([x, b], 1).mean(1)
    if spelling == "x - (-b)":
        return x - (-b)
    if spelling == "x.sub(b.neg())":
        return x.sub(b.neg())
    if spelling == "x - b":
        return x - b
    if spelling == "torch.add(x, b, alpha=0.5)":
        return torch.add(x, b, alpha=0.5)
    if spelling == "torch.sub(x, b, alpha=2)":
        return torch.sub(x, b, alpha=2)
    if spelling == "sum([x, b])":
        return sum([x, b])
    if spelling == "x.add_(b)":
        return x.clone().add_(b)
    if spelling == "x.addcdiv(b, 1 + t)":
        return x.addcdiv(b, 1 + t)
    if spelling == "x.lerp(b, 0.3)":
        return x.lerp(b, 0.3)
    if spelling == "x.lerp(b, t)":
        return x.lerp(b, t)
    raise AssertionError(spelling)


OTHER_SPELLINGS = ["x.addcmul(b, t)", "torch.addcmul(x, b, t, value=0.5)", "torch.stack([x, b]).sum(0)",
                   "torch.stack([x, b], 1).mean(1)", "x - (-b)", "x.sub(b.neg())", "x - b",
                   "torch.add(x, b, alpha=0.5)", "torch.sub(x, b, alpha=2)", "sum([x, b])", "x.add_(b)",
                   "x.addcdiv(b, 1 + t)", "x.lerp(b, 0.3)", "x.lerp(b, t)"]


class Spelled(nn.Module):
    def __init__(self, spelling: str):
        super().__init__()
        self.spelling = spelling
        self.stem, self.a, self.b = conv_bn(3, D), conv_bn(D, D), conv_bn(D, D)
        self.gate = nn.Conv2d(D, D, 1)
        self.fc = nn.Linear(D, 2)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        branch = self.b(torch.relu(self.a(h)))
        t = torch.sigmoid(self.gate(h))
        out = residual_spelling(self.spelling, h, branch, t)
        return self.fc(torch.relu(out).mean((2, 3)))


@pytest.mark.parametrize("spelling", OTHER_SPELLINGS)
def test_every_spelling_of_a_residual_add_is_found(spelling, roles):
    report = gg.analyze(Spelled(spelling), IMAGE)
    assert roles(report) == {"stem.1.weight": "stream", "a.1.weight": "scale_invariant", "b.1.weight": "residual_last"}
    [add] = report.residual_adds
    assert add.branches == 1 and add.skip_weighted == 0


def test_addmm_adding_to_an_activation_is_a_residual_add(roles):
    """``torch.addmm(x, h, w)`` computes ``x + h @ w``: with ``x`` the stream, a fused residual linear."""

    class Fused(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm, self.final, self.head = nn.LayerNorm(D), nn.LayerNorm(D), nn.Linear(D, 2)
            self.w = nn.Parameter(torch.randn(D, D) / D)

        def forward(self, x):
            x = torch.addmm(x, self.norm(x), self.w)
            return self.head(self.final(x))

    report = gg.analyze(Fused(), torch.randn(4, D))
    assert roles(report) == {"norm.weight": "residual_last", "final.weight": "head"}
    [add] = report.residual_adds
    assert (add.skip_weighted, add.branch_weighted) == (0, 2)


def test_residual_variances_of_a_sum_of_several_branches():
    """var(branch) of ``h + f + g`` is var(f) + var(g), measured on the operands themselves."""
    from gammaguide.analysis import residual_variances

    model = ThreeWay("g + h + f").eval()
    got = residual_variances(model, IMAGE)
    assert [v.module_name for v in got] == ["<model>", "<model>"]
    with torch.no_grad():
        h = torch.relu(model.stem(IMAGE))
        f = model.f2[0](torch.relu(model.f1[0](h)))
        g = model.g[0](h)
    first = got[0]
    assert first.skip_var == pytest.approx(float(h.var()), rel=1e-4)
    assert first.branch_var == pytest.approx(float(f.var()) + float(g.var()), rel=1e-4)


class TwoEmbeddings(nn.Module):
    """Token and a second embedding of the same ids, added: their one common ancestor is the integer
    ids, which carries no stream."""

    def __init__(self):
        super().__init__()
        self.tok, self.other = nn.Embedding(10, D), nn.Embedding(10, D)
        self.norm, self.head = nn.LayerNorm(D), nn.Linear(D, 2)

    def forward(self, ids):
        return self.head(self.norm(self.tok(ids) + self.other(ids)))


def test_embeddings_of_the_same_ids_share_no_stream():
    sums = trace_model(TwoEmbeddings(), torch.arange(6).view(1, 6)).flow.sums
    assert sums.residual() == [] and list(sums.not_residual.values()) == ["no fork"]
