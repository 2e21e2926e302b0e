"""Dataflow rules: residual additions in every spelling, in-place ops, containers, shared γ,
hand-written normalizations (registry and behavioural rule) and the warnings for misses."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from torch import nn

import gammaguide as gg
from gammaguide import norms

# Every test twice: analyze's default pass on meta tensors, and the real pass (conftest.py).
pytestmark = pytest.mark.usefixtures("forward_pass")

D = 8
SEQ = torch.randn(2, 5, D)


def conv_bn(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout))


# ----------------------------------------------------------------------------- residual additions


def _add(spelling: str, skip: torch.Tensor, branch: torch.Tensor, skip_first: bool) -> torch.Tensor:
    a, b = (skip, branch) if skip_first else (branch, skip)
    if spelling == "+":
        return a + b
    if spelling == "+=":
        a += b
        return a
    if spelling == "torch.add":
        return torch.add(a, b)
    if spelling == "add_":
        return a.add_(b)
    raise AssertionError(spelling)


class Block(nn.Module):
    """stem BN -> ReLU(inplace) -> [conv-BN-ReLU(inplace)-conv-BN] added to the skip in ``spelling``."""

    def __init__(self, spelling: str, skip_first: bool):
        super().__init__()
        self.spelling, self.skip_first = spelling, skip_first
        self.stem = conv_bn(3, D)
        self.a, self.b = conv_bn(D, D), conv_bn(D, D)
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(D, 2)

    def forward(self, x):
        h = self.relu(self.stem(x))
        branch = self.b(self.relu(self.a(h)))
        # An in-place add writes into its first argument; when that is the skip side, give it a
        # copy, as ``h`` itself is still the (already consumed) input of the branch.
        skip = h.clone() if self.skip_first else h
        out = _add(self.spelling, skip, branch, self.skip_first)
        return self.fc(self.relu(out).mean((2, 3)))


@pytest.mark.parametrize("skip_first", [True, False])
@pytest.mark.parametrize("spelling", ["+", "+=", "torch.add", "add_"])
def test_residual_add_spellings(spelling, skip_first, roles):
    report = gg.analyze(Block(spelling, skip_first), torch.randn(2, 3, 8, 8))
    assert roles(report) == {
        "stem.1.weight": "stream", "a.1.weight": "scale_invariant", "b.1.weight": "residual_last",
    }
    [add] = report.residual_adds
    assert add.skip_arg == (0 if skip_first else 1)
    assert add.branch_weighted > add.skip_weighted


class Chain(nn.Module):
    """Three branches added to the skip in one chain of additions, the skip entering the chain's
    last op as its first argument (``((h + a) + b) + c``) or its second (``c + (b + (a + h))``)."""

    def __init__(self, skip_first: bool):
        super().__init__()
        self.skip_first = skip_first
        self.stem, self.a, self.b, self.c = conv_bn(3, D), conv_bn(D, D), conv_bn(D, D), conv_bn(D, D)
        self.fc = nn.Linear(D, 2)

    def forward(self, x):
        h = self.stem(x)
        a, b, c = self.a(h), self.b(h), self.c(h)
        out = ((h + a) + b) + c if self.skip_first else c + (b + (a + h))
        return self.fc(out.mean((2, 3)))


@pytest.mark.parametrize("skip_first", [True, False])
def test_a_chain_of_additions_is_one_residual_add_at_its_last_op(skip_first, roles):
    from gammaguide.analysis import trace_model

    model, x = Chain(skip_first), torch.randn(2, 3, 8, 8)
    assert roles(gg.analyze(model, x)) == {
        "stem.1.weight": "stream", "a.1.weight": "residual_last", "b.1.weight": "residual_last",
        "c.1.weight": "residual_last",
    }
    traced = trace_model(model, x)
    [add] = traced.flow.residual_adds()
    names = traced.graph.op_names()
    assert add.node == max(i for i, n in enumerate(names) if n == "add")  # the chain's last op
    assert add.branches == 3
    # Through which argument of that last op the skip arrives, the chain's earlier adds in between.
    assert add.skip_arg == (0 if skip_first else 1)


class NotResidual(nn.Module):
    """A norm followed by additions that are not residual: a parameter (positional embedding),
    a buffer, a Python constant, a tensor constant, and the same tensor twice."""

    def __init__(self, what: str):
        super().__init__()
        self.what = what
        self.conv, self.bn = nn.Conv2d(3, D, 3, padding=1, bias=False), nn.BatchNorm2d(D)
        self.pos = nn.Parameter(torch.randn(1, D, 1, 1))
        self.register_buffer("table", torch.randn(1, D, 1, 1))
        self.fc = nn.Linear(D, 2)

    def forward(self, x):
        h = self.bn(self.conv(x))
        if self.what == "parameter":
            h = h + self.pos
        elif self.what == "parameter_":
            h += self.pos
        elif self.what == "buffer":
            h = torch.add(h, self.table)
        elif self.what == "constant":
            h = h + 1.0
        elif self.what == "tensor constant":
            h = h + torch.ones(1, D, 1, 1)
        elif self.what == "itself":
            h = h + h
        return self.fc(h.mean((2, 3)))


@pytest.mark.parametrize("what", ["parameter", "parameter_", "buffer", "constant", "tensor constant", "itself"])
def test_adds_that_are_not_residual(what, roles):
    report = gg.analyze(NotResidual(what), torch.randn(2, 3, 8, 8))
    assert report.residual_adds == ()
    assert roles(report) == {"bn.weight": "head"}


def test_residual_add_found_through_views_and_reshapes(roles):
    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm, self.fc, self.head = nn.LayerNorm(D), nn.Linear(D, D), nn.Linear(D, 2)

        def forward(self, x):  # x: (B, C, H, W) -> tokens and back
            t = x.flatten(2).transpose(1, 2)
            y = self.fc(self.norm(t)).transpose(1, 2).reshape(x.shape)
            return self.head((x + y).mean((2, 3)))

    assert roles(gg.analyze(Tokens(), torch.randn(2, D, 3, 3))) == {"norm.weight": "residual_last"}


# ----------------------------------------------------------------------------- containers


@dataclasses.dataclass
class Out:
    logits: torch.Tensor
    extras: tuple


class Containers(nn.Module):
    """Keyword and tuple inputs, submodules passing dicts, a dataclass in a tuple in a dict out."""

    def __init__(self):
        super().__init__()
        self.enc = nn.ModuleDict({"proj": nn.Linear(D, D), "norm": nn.LayerNorm(D)})
        self.mlp = nn.Sequential(nn.Linear(D, D), nn.GELU(), nn.Linear(D, D))
        self.final = nn.LayerNorm(D)
        self.head = nn.Linear(D, 2)

    def encode(self, pair):
        a, b = pair
        return {"h": self.enc["proj"](a + b)}

    def forward(self, pair, scale=None):
        state = self.encode(pair)
        state["h"] = state["h"] + self.mlp(self.enc["norm"](state["h"]))
        out = Out(self.head(self.final(state["h"])), (state["h"] * scale,))
        return {"out": (out,), "aux": [state["h"].sum()]}


def test_tensors_through_dicts_dataclasses_and_tuples(roles):
    report = gg.analyze(Containers(), {"pair": (SEQ, SEQ.clone()), "scale": torch.tensor(2.0)})
    assert roles(report) == {"enc.norm.weight": "residual_last", "final.weight": "head"}
    assert report.input_shapes == ("pair[0]: float32[2, 5, 8]", "pair[1]: float32[2, 5, 8]", "scale: float32[]")


def test_tuple_of_positional_inputs(roles):
    report = gg.analyze(Containers(), ((SEQ, SEQ.clone()), torch.tensor(1.0)))
    assert roles(report)["final.weight"] == "head"


def test_list_is_one_positional_input(roles):
    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm, self.head = nn.LayerNorm(D), nn.Linear(D, 2)

        def forward(self, xs):
            return self.head(self.norm(xs[0] * xs[1]))

    report = gg.analyze(Pair(), [SEQ, SEQ.clone()])
    assert roles(report) == {"norm.weight": "head"}
    assert report.input_shapes == ("args[0][0]: float32[2, 5, 8]", "args[0][1]: float32[2, 5, 8]")


def test_norm_output_returned_directly_is_head(roles):
    report = gg.analyze(nn.Sequential(nn.Linear(D, D), nn.LayerNorm(D)), torch.randn(2, D))
    assert roles(report) == {"1.weight": "head"}


# ----------------------------------------------------------------------------- shared γ, unused γ


class Shared(nn.Module):
    """One BN called twice: first re-normalized (scale_invariant), then ending a branch."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.c3 = (nn.Conv2d(3 if i == 0 else D, D, 3, padding=1, bias=False) for i in range(3))
        self.bn, self.bn2 = nn.BatchNorm2d(D), nn.BatchNorm2d(D)
        self.spare = nn.BatchNorm2d(D)  # never called
        self.fc = nn.Linear(D, 2)

    def forward(self, x):
        h = self.bn2(self.c2(torch.relu(self.bn(self.c1(x)))))
        h = h + self.bn(self.c3(h))
        return self.fc(h.mean((2, 3)))


def test_gamma_used_twice_takes_the_strongest_role(roles):
    got = roles(gg.analyze(Shared(), torch.randn(2, 3, 8, 8)))
    assert got["bn.weight"] == "residual_last"  # beats scale_invariant from its first use
    assert got["bn2.weight"] == "stream"


def test_norm_never_called_is_unused(roles):
    report = gg.analyze(Shared(), torch.randn(2, 3, 8, 8))
    entry = next(e for e in report.entries if e.param_name == "spare.weight")
    assert entry.role == "unused" and entry.paper_category is None and not entry.decay


def test_shared_module_under_two_names_is_one_entry():
    model = nn.Sequential(nn.Linear(D, D), nn.LayerNorm(D))
    model.add_module("alias", model[1])
    report = gg.analyze(model, torch.randn(2, D))
    assert [e.param_name for e in report.entries] == ["1.weight"]


# ----------------------------------------------------------------------------- hand-written norms


class RMS(nn.Module):
    """LLaMA-style RMSNorm, under a name the registry does not know."""

    def __init__(self, d=D):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))


class MeanStd(nn.Module):
    """A LayerNorm written with std, with its own names for γ and β."""

    def __init__(self, d=D):
        super().__init__()
        self.g = nn.Parameter(torch.ones(d))
        self.b = nn.Parameter(torch.zeros(d))

    def forward(self, x):
        return (x - x.mean(-1, keepdim=True)) / (x.std(-1, keepdim=True) + 1e-5) * self.g + self.b


class ScaleFirst(nn.Module):
    """RMSNorm with the γ applied to the input first: ``w * x * rsqrt(mean(x²))``."""

    def __init__(self, d=D):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


class DivideByStd(nn.Module):
    """``g * (x - mean) / std + b``: γ on the centred input, then divided by the statistic."""

    def __init__(self, d=D):
        super().__init__()
        self.g = nn.Parameter(torch.ones(d))
        self.b = nn.Parameter(torch.zeros(d))

    def forward(self, x):
        return self.g * (x - x.mean(-1, keepdim=True)) / (x.std(-1, keepdim=True) + 1e-5) + self.b


class Prescaled(nn.Module):
    """Scales, then normalizes the product: the scale cancels out, so it is no γ (and the
    class name does not look like a norm, so nothing is warned about either)."""

    def __init__(self, d=D):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        h = self.weight * x
        return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)


class AbsScale(nn.Module):
    """Normalizes by the mean absolute value: no statistic the behavioural rule knows."""

    def __init__(self, d=D):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return x / (x.abs().mean(-1, keepdim=True) + 1e-6) * self.weight


class NotANorm(nn.Module):
    """Named like a norm, scales without normalizing."""

    def __init__(self, d=D):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return x * self.weight


def pre_ln(norm: type) -> nn.Module:
    """Two pre-norm residual blocks and a final norm, on (B, T, D) sequences."""

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm, self.fc = norm(), nn.Linear(D, D)

        def forward(self, x):
            return x + self.fc(self.norm(x))

    return nn.Sequential(Layer(), Layer(), norm(), nn.Linear(D, 2))


PRE_LN_ROLES = {"0.norm": "residual_last", "1.norm": "residual_last", "2": "head"}


@pytest.mark.parametrize("norm, gamma, beta", [
    (RMS, "weight", None), (MeanStd, "g", "b"), (ScaleFirst, "weight", None), (DivideByStd, "g", "b"),
])
def test_behavioural_rule(norm, gamma, beta, roles):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = gg.analyze(pre_ln(norm), SEQ)
    assert roles(report) == {f"{m}.{gamma}": r for m, r in PRE_LN_ROLES.items()}
    assert {e.norm_type for e in report.entries} == {norm.__name__}
    kinds = {p.name: p.kind for p in report.params}
    if beta:
        assert {kinds[f"{m}.{beta}"] for m in PRE_LN_ROLES} == {"beta"}


def test_a_scale_normalized_away_is_not_a_gamma():
    report = gg.analyze(pre_ln(Prescaled), SEQ)
    assert report.entries == () and report.warnings == ()
    assert {p.kind for p in report.params if p.name.endswith("norm.weight")} == {"other"}


def renamed(cls: type, name: str) -> type:
    return type(name, (cls,), {})


def test_registry_recognises_known_classes_without_the_behavioural_rule(roles):
    # ScaleNorm is in the registry; the same computation under an unknown name is missed.
    known = gg.analyze(pre_ln(renamed(AbsScale, "ScaleNorm")), SEQ)
    assert roles(known) == {f"{m}.weight": r for m, r in PRE_LN_ROLES.items()}
    with pytest.warns(UserWarning) as record:
        missed = gg.analyze(pre_ln(renamed(AbsScale, "AbsNorm")), SEQ)
    assert missed.entries == ()
    assert any("module '0.norm' (AbsNorm) looks like a normalization" in str(w.message) for w in record)


def registry_norm(gamma: str, beta: str) -> type:
    """A class the registry knows by name (``RMSNorm``, as Apex, Megatron and many ports call theirs)
    holding its γ and β under the attribute names ``gamma`` and ``beta``. It normalizes by the mean
    absolute value, which the behavioural rule does not know: only the registry can find it."""

    def __init__(self, d=D):
        nn.Module.__init__(self)
        setattr(self, gamma, nn.Parameter(torch.ones(d)))
        setattr(self, beta, nn.Parameter(torch.zeros(d)))

    def forward(self, x):
        return x / (x.abs().mean(-1, keepdim=True) + 1e-6) * getattr(self, gamma) + getattr(self, beta)

    return type("RMSNorm", (nn.Module,), {"__init__": __init__, "forward": forward})


# The names a registry norm's γ and β go by: ``weight``/``bias`` (PyTorch, Hugging Face), ``scale``
# (Flax's LayerNorm and RMSNorm, so a ported model keeps ``self.scale``), ``gamma``/``beta`` (Keras,
# lucidrains), ``g``/``b`` (x-transformers), ``shift``.
@pytest.mark.parametrize("gamma, beta", [("weight", "bias"), ("scale", "shift"), ("gamma", "beta"), ("g", "b")])
def test_a_registry_norm_finds_its_gamma_and_beta_under_every_usual_name(gamma, beta, roles):
    assert "RMSNorm" in norms.KNOWN_NORM_CLASSES
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = gg.analyze(pre_ln(registry_norm(gamma, beta)), SEQ)
    assert roles(report) == {f"{m}.{gamma}": r for m, r in PRE_LN_ROLES.items()}
    assert {e.norm_type for e in report.entries} == {"RMSNorm"}
    kinds = {p.name: p.kind for p in report.params}
    assert {kinds[f"{m}.{beta}"] for m in PRE_LN_ROLES} == {"beta"}


def test_register_norm_class(monkeypatch, roles):
    monkeypatch.setattr(norms, "KNOWN_NORM_CLASSES", norms.KNOWN_NORM_CLASSES)  # restored after the test
    cls = renamed(AbsScale, "MyAbsNorm")
    gg.register_norm_class("MyAbsNorm")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = gg.analyze(pre_ln(cls), SEQ)
    assert roles(report) == {f"{m}.weight": r for m, r in PRE_LN_ROLES.items()}
    with pytest.raises(gg.GammaGuideError, match="non-empty string"):
        gg.register_norm_class("")


def test_hugging_face_hand_written_norms_are_known():
    pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from transformers.models.t5.modeling_t5 import T5LayerNorm

    for cls in (LlamaRMSNorm, T5LayerNorm):
        assert cls.__name__ in norms.KNOWN_NORM_CLASSES
        model = nn.Sequential(nn.Linear(D, D), cls(D), nn.Linear(D, 2))
        report = gg.analyze(model, torch.randn(2, D))
        assert [(e.param_name, e.norm_type, e.role) for e in report.entries] == [("1.weight", cls.__name__, "head")]


def test_warning_names_an_unrecognised_norm_looking_module():
    cls = renamed(AbsScale, "FancyNorm")  # normalizes by a statistic the behavioural rule does not know
    model = pre_ln(cls)
    with pytest.warns(UserWarning) as record:
        report = gg.analyze(model, SEQ)
    messages = [str(w.message) for w in record]
    fancy = [name for name, m in model.named_modules() if isinstance(m, cls)]
    for module in fancy:
        assert any(f"module '{module}' (FancyNorm)" in m and "register_norm_class" in m for m in messages), module
    assert report.entries == () and len(report.warnings) == len(fancy)
    assert {p.kind for p in report.params if p.name.endswith("norm.weight")} == {"other"}


def test_a_norm_named_module_that_only_scales_is_no_normalization():
    # Named like a norm, reduces nothing: an affine map (MobileBERT's NoNorm), nothing to warn about.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = gg.analyze(pre_ln(renamed(NotANorm, "FancyNorm")), SEQ)
    assert report.entries == () and report.warnings == ()


def test_warning_names_a_gamma_like_parameter_outside_a_norm():
    class Squashed(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.scale, self.head = nn.Linear(D, D), nn.Parameter(torch.ones(D)), nn.Linear(D, 2)

        def forward(self, x):
            h = self.fc(x)
            return self.head(self.scale * torch.tanh(h / h.std(-1, keepdim=True)))

    with pytest.warns(UserWarning) as record:
        report = gg.analyze(Squashed(), torch.randn(2, D))
    assert [str(w.message)[:97] for w in record] == [
        "parameter 'scale' (in Squashed '') multiplies a tensor normalized by a statistic of an activation"]
    assert report.entries == ()


def test_no_warning_for_recognised_models():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = gg.analyze(pre_ln(lambda: nn.LayerNorm(D)), SEQ)
    assert len(report.entries) == len(PRE_LN_ROLES) and report.warnings == ()


def test_functional_norm_inside_a_bigger_module(roles):
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.w, self.b = nn.Parameter(torch.ones(D)), nn.Parameter(torch.zeros(D))
            self.fc, self.head = nn.Linear(D, D), nn.Linear(D, 2)

        def forward(self, x):
            x = x + self.fc(nn.functional.layer_norm(x, (D,), self.w, self.b))
            return self.head(x)

    report = gg.analyze(Functional(), SEQ)
    assert roles(report) == {"w": "residual_last"}
    assert report.entries[0].norm_type == "functional layer_norm"
    assert {p.name: p.kind for p in report.params}["b"] == "beta"


class ScaledByConstants(nn.Module):
    """A residual block with constants made in forward (``torch.ones``, ``torch.zeros``)."""

    def __init__(self):
        super().__init__()
        self.stem, self.a, self.b = conv_bn(3, D), conv_bn(D, D), conv_bn(D, D)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(D, 2)

    def forward(self, x):
        h = self.relu(self.stem(x))
        out = h + self.b(self.relu(self.a(h))) * torch.ones(D, 1, 1, device=x.device)
        return self.fc((self.relu(out) + torch.zeros(1, device=x.device)).mean((2, 3)))


def test_constants_made_in_forward_are_the_constant_leaf_not_ops(roles):
    """A tensor made from no tensor (a factory op) is a constant: no node of its own, read as the one
    constant leaf, and the roles around it are those of the same block without it."""
    from gammaguide.analysis import trace_model

    model, x = ScaledByConstants(), torch.randn(2, 3, 8, 8)
    graph = trace_model(model, x).graph
    names = graph.op_names()
    assert not {"ones", "zeros", "empty", "full"} & set(names)
    mul = names.index("mul")
    assert names[graph.ins[mul][1]] == "const"  # the branch times the ones: read as the constant leaf
    assert roles(gg.analyze(model, x)) == {"stem.1.weight": "stream", "a.1.weight": "scale_invariant",
                                           "b.1.weight": "residual_last"}
