"""Policies and optimizer parameter groups: the partition invariants and every option."""

from __future__ import annotations

import sys
import warnings

import pytest
import torch
from torch import nn

import gammaguide as gg
from gammaguide import groups as groups_module


class Zoo(nn.Module):
    """Every γ role and every kind of parameter in a few layers, on 8x8 images.

    block 1 (identity skip):   stem_bn -> conv1 -> bn1 -> conv2 -> bn2 -> conv3 (bias) -> layer_scale -> + stem
    block 2 (projection skip): conv4 -> bn4 -> conv5 -> bn5 -> +  proj -> proj_bn
    head: + pos (a parameter, not a residual add) -> pool -> frozen linear -> LayerNorm -> fc
    """

    ROLES = {
        "stem_bn.weight": "stream", "bn1.weight": "scale_invariant", "bn2.weight": "residual_last",
        "bn4.weight": "scale_invariant", "bn5.weight": "residual_last", "proj_bn.weight": "shortcut",
        "norm.weight": "head",
    }
    KINDS = {
        **{n: "gamma" for n in ROLES},
        **{n.replace("weight", "bias"): "beta" for n in ROLES},
        **{f"{c}.weight": "weight" for c in ("stem", "conv1", "conv2", "conv3", "conv4", "conv5", "proj", "fc")},
        "pos": "weight",
        "conv3.bias": "bias", "fc.bias": "bias",
        "layer_scale": "other",
    }
    FROZEN = ("frozen.weight", "frozen.bias")

    def __init__(self):
        super().__init__()

        def conv(cin, cout, k=3, stride=1, bias=False):
            return nn.Conv2d(cin, cout, k, stride, k // 2, bias=bias)

        self.stem, self.stem_bn = conv(3, 8), nn.BatchNorm2d(8)
        self.conv1, self.bn1 = conv(8, 8), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = conv(8, 8), nn.BatchNorm2d(8)
        self.conv3 = conv(8, 8, 1, bias=True)
        self.layer_scale = nn.Parameter(torch.full((8,), 0.1))
        self.conv4, self.bn4 = conv(8, 16, stride=2), nn.BatchNorm2d(16)
        self.conv5, self.bn5 = conv(16, 16), nn.BatchNorm2d(16)
        self.proj, self.proj_bn = conv(8, 16, 1, stride=2), nn.BatchNorm2d(16)
        self.pos = nn.Parameter(torch.zeros(1, 16, 4, 4))  # a positional embedding: a weight
        self.frozen = nn.Linear(16, 16).requires_grad_(False)
        self.norm = nn.LayerNorm(16)
        self.fc = nn.Linear(16, 4)
        self.fc_alias = self.fc  # one module under two names: its parameters are counted once

    def no_weight_decay(self):
        return {"pos"}

    def forward(self, x):
        h = torch.relu(self.stem_bn(self.stem(x)))
        b = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(h)))))
        h = h + self.layer_scale.view(-1, 1, 1) * self.conv3(torch.relu(b))
        b = self.bn5(self.conv5(torch.relu(self.bn4(self.conv4(h)))))
        h = torch.relu(b + self.proj_bn(self.proj(h)))
        h = (h + self.pos).mean((2, 3))
        return self.fc(self.norm(self.frozen(h)))


X = torch.randn(2, 3, 8, 8)
WD = 5e-4


def expected_decay(policy, kind: str, role: str | None) -> bool:
    """The issue's policy table, written out independently of gammaguide.policy."""
    if policy == "all":
        return True
    if kind == "weight":
        return True
    if kind != "gamma":
        return False
    if isinstance(policy, dict):
        return policy.get(role, False)
    if policy == "guidelines":
        return role in ("residual_last", "scale_invariant")
    if policy.startswith("only:"):
        return role == policy[5:]
    assert policy in ("no_norm", "no_gamma")
    return False


ALL_POLICIES = [*gg.POLICIES, {"stream": True, "head": True}, {}]


@pytest.fixture(scope="module")
def zoo():
    return Zoo()


def test_zoo_roles_and_kinds(zoo, roles):
    report = gg.analyze(zoo, X)
    assert roles(report) == Zoo.ROLES
    assert {p.name: p.kind for p in report.params if p.trainable} == Zoo.KINDS
    assert report.warnings == ()
    assert len(report.residual_adds) == 2


def assert_partition(model: nn.Module, groups: list[dict]) -> None:
    seen = [id(p) for g in groups for p in g["params"]]
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert len(seen) == len(set(seen)), "a parameter is in two groups"
    assert set(seen) == trainable, "trainable parameters missing or frozen ones present"
    keys = [(g["weight_decay"], g.get("lr"), g.get("lr_scale", 1.0)) for g in groups]
    assert len(keys) == len(set(keys)), "two groups with the same settings"
    for g in groups:
        assert isinstance(g["params"], list) and g["params"]
        assert isinstance(g["name"], str) and g["name"]


@pytest.mark.parametrize("policy", ALL_POLICIES, ids=str)
def test_policy_decisions_and_partition(zoo, policy):
    groups = gg.param_groups(zoo, WD, X, policy)
    assert_partition(zoo, groups)
    decayed = {id(p) for g in groups if g["weight_decay"] == WD for p in g["params"]}
    assert all(g["weight_decay"] in (0.0, WD) for g in groups)
    named = dict(zoo.named_parameters())
    for name, kind in Zoo.KINDS.items():
        want = expected_decay(policy, kind, Zoo.ROLES.get(name)) and name != "pos"
        assert (id(named[name]) in decayed) == want, f"{name} ({kind}) under {policy}"


@pytest.mark.parametrize("policy", ALL_POLICIES, ids=str)
def test_report_decisions_match_groups(zoo, policy):
    report = gg.analyze(zoo, X, policy)
    groups = gg.param_groups(zoo, WD, policy=policy, report=report)
    named = dict(zoo.named_parameters())
    in_decay = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    for name, decay in report.decisions().items():
        if named[name].requires_grad:
            assert (id(named[name]) in in_decay) == decay, name
    for e in report.entries:
        assert e.decay == report.decisions()[e.param_name]


def test_frozen_params_in_no_group_but_in_report(zoo):
    report = gg.analyze(zoo, X)
    assert {p.name for p in report.params if not p.trainable} == set(Zoo.FROZEN)
    frozen = {id(p) for p in zoo.frozen.parameters()}
    assert not frozen & {id(p) for g in gg.param_groups(zoo, WD, X) for p in g["params"]}


def test_decay_bias_and_beta_options(zoo):
    named = dict(zoo.named_parameters())
    for option, kind in (("decay_bias", "bias"), ("decay_beta", "beta")):
        for value in (True, False):
            groups = gg.param_groups(zoo, WD, X, **{option: value})
            assert_partition(zoo, groups)
            decayed = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
            names = [n for n, k in Zoo.KINDS.items() if k == kind]
            assert names and all((id(named[n]) in decayed) == value for n in names), (option, value)
    # "all" decays biases unless told otherwise.
    groups = gg.param_groups(zoo, WD, X, "all", decay_bias=False)
    decayed = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    assert id(named["fc.bias"]) not in decayed and id(named["bn2.bias"]) in decayed


def test_skip_list_exact_and_dotted_suffix(zoo):
    report = gg.analyze(zoo, X, skip_list=("bn2.weight", "conv1.weight"))
    d = report.decisions()
    assert not d["bn2.weight"] and not d["conv1.weight"]
    assert d["bn1.weight"] and d["conv2.weight"]
    assert "skip_list" in next(e.reason for e in report.entries if e.param_name == "bn2.weight")
    # A suffix matches whole dotted components only: "n2.weight" names nothing.
    assert gg.analyze(zoo, X, skip_list=("n2.weight",)).decisions()["bn2.weight"]


def test_no_weight_decay_method_is_honoured(zoo):
    assert not gg.analyze(zoo, X).decisions()["pos"]
    plain = Zoo()
    plain.no_weight_decay = lambda: set()
    assert gg.analyze(plain, X).decisions()["pos"]


def test_lr_scale_with_and_without_base_lr(zoo):
    stream = [id(zoo.stem_bn.weight)]
    groups = gg.param_groups(zoo, WD, X, lr=0.1, lr_scale={"stream": 0.5})
    assert_partition(zoo, groups)
    scaled = [g for g in groups if "lr_scale" in g]
    assert len(scaled) == 1 and [id(p) for p in scaled[0]["params"]] == stream
    assert scaled[0]["lr_scale"] == 0.5 and scaled[0]["lr"] == pytest.approx(0.05)
    assert scaled[0]["weight_decay"] == 0.0
    assert {g["lr"] for g in groups if "lr_scale" not in g} == {0.1}

    groups = gg.param_groups(zoo, WD, X, lr_scale={"stream": 0.5, "residual_last": 2.0})
    assert all("lr" not in g for g in groups)
    by_scale = {g["lr_scale"]: {id(p) for p in g["params"]} for g in groups if "lr_scale" in g}
    assert by_scale == {0.5: set(stream), 2.0: {id(zoo.bn2.weight), id(zoo.bn5.weight)}}


@pytest.mark.parametrize("make", [lambda g: torch.optim.SGD(g, lr=0.1, momentum=0.9),
                                  lambda g: torch.optim.AdamW(g, lr=0.1)], ids=["SGD", "AdamW"])
def test_groups_work_with_torch_optimizers(make):
    """A step with zero gradients moves a parameter by its weight decay alone: the optimizer must
    shrink each parameter the policy decays by 1 - lr * weight_decay (SGD's L2 term and AdamW's
    decoupled decay alike) and leave every other one, frozen ones included, as it was."""
    model, lr, wd = Zoo(), 0.1, 0.5
    opt = make(gg.param_groups(model, wd, X))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    opt.step()
    shrunk = []
    for name, p in model.named_parameters():
        decayed = name in Zoo.KINDS and name != "pos" and expected_decay("guidelines", Zoo.KINDS[name],
                                                                         Zoo.ROLES.get(name))
        want = before[name] * (1 - lr * wd) if decayed else before[name]
        assert torch.allclose(p.detach(), want, rtol=1e-6, atol=0), name
        shrunk += [name] * decayed
    assert sorted(shrunk) == sorted([*(f"{c}.weight" for c in ("stem", "conv1", "conv2", "conv3", "conv4", "conv5",
                                                                "proj", "fc")),
                                     "bn1.weight", "bn2.weight", "bn4.weight", "bn5.weight"])


def test_other_1d_params_listed_apart(zoo):
    report = gg.analyze(zoo, X)
    assert [p.name for p in report.others] == ["layer_scale"]
    assert report.to_dict()["others"] == ["layer_scale"]
    assert "layer_scale" in str(report)
    assert not report.decisions()["layer_scale"]
    assert gg.analyze(zoo, X, "all").decisions()["layer_scale"]


def test_tied_weights_counted_once():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=64)
    model = transformers.GPT2LMHeadModel(config)
    assert model.lm_head.weight is model.transformer.wte.weight
    groups = gg.param_groups(model, WD, {"input_ids": torch.zeros(1, 8, dtype=torch.long)})
    assert_partition(model, groups)


def test_report_reused_without_tracing_again(zoo, monkeypatch):
    report = gg.analyze(zoo, X)

    def no_trace(*args, **kwargs):
        raise AssertionError("traced again")

    monkeypatch.setattr(groups_module, "analyze", no_trace)
    assert_partition(zoo, gg.param_groups(zoo, WD, report=report))


def test_bad_group_arguments(zoo):
    with pytest.raises(gg.GammaGuideError, match="weight_decay"):
        gg.param_groups(zoo, -1.0, X)
    with pytest.raises(gg.GammaGuideError, match="lr_scale.*bogus"):
        gg.param_groups(zoo, WD, X, lr_scale={"bogus": 2.0})
    with pytest.raises(gg.GammaGuideError, match="unknown policy 'nope'.*guidelines"):
        gg.param_groups(zoo, WD, X, "nope")
    with pytest.raises(gg.GammaGuideError, match="only:bogus"):
        gg.analyze(zoo, X, "only:bogus")
    with pytest.raises(gg.GammaGuideError, match="unknown role.*'bogus'"):
        gg.analyze(zoo, X, {"bogus": True})
    with pytest.raises(gg.GammaGuideError, match="mapping"):
        gg.analyze(zoo, X, 3)


def test_policies_and_roles_are_published():
    assert gg.ROLES == ("residual_last", "scale_invariant", "merged", "shortcut", "stream", "head", "unused")
    assert {"guidelines", "all", "no_norm"} <= set(gg.POLICIES)
    assert {f"only:{r}" for r in gg.ROLES if r != "unused"} <= set(gg.POLICIES)


def test_a_per_channel_vector_kept_as_c_by_1_by_1_is_not_a_weight():
    """torchvision's ConvNeXt stores its layer scale as C x 1 x 1; it is a scale like timm's 1-D
    layer scale, listed apart and not decayed, while real weight tensors are decayed."""
    import torchvision

    model = torchvision.models.convnext_tiny()
    report = gg.analyze(model, torch.randn(1, 3, 64, 64), warn=False)
    info = {p.name: p for p in report.params}
    scale = info["features.1.0.layer_scale"]
    assert scale.shape == (96, 1, 1) and scale.kind == "other" and not scale.decay
    assert info["features.1.0.block.0.weight"].kind == "weight" and info["features.1.0.block.0.weight"].decay
    assert "features.1.0.layer_scale" in {p.name for p in report.others}


def test_skip_list_through_param_groups_with_and_without_a_report(zoo):
    named = dict(zoo.named_parameters())
    skipped = {id(named["bn2.weight"]), id(named["conv1.weight"])}

    def undecayed(groups):
        return {id(p) for g in groups if g["weight_decay"] == 0 for p in g["params"]}

    traced = gg.param_groups(zoo, WD, X, skip_list=("bn2.weight", "conv1.weight"))
    reused = gg.param_groups(zoo, WD, report=gg.analyze(zoo, X), skip_list=("bn2.weight", "conv1.weight"))
    plain = gg.param_groups(zoo, WD, X)
    for groups in (traced, reused):
        assert_partition(zoo, groups)
        assert skipped <= undecayed(groups)
        assert undecayed(groups) - skipped == undecayed(plain)


def test_group_messages_name_the_problem(zoo):
    with pytest.raises(gg.GammaGuideError, match=r"unknown role\(s\) \['sream'\]; roles are residual_last, "
                                                 r"scale_invariant, merged"):
        gg.param_groups(zoo, WD, X, lr_scale={"sream": 0.5})
    with pytest.raises(gg.GammaGuideError, match=r"lr_scale\['stream'\] must be a finite number >= 0, got -1; "
                                                 r"pass a factor such as lr_scale=\{'stream': 0.5\}"):
        gg.param_groups(zoo, WD, X, lr_scale={"stream": -1})
    with pytest.raises(gg.GammaGuideError, match=r"^decay_bias and decay_beta are decided when the report is made: "
                                                 r"pass them to gammaguide.analyze\(\), or leave report= out$"):
        gg.param_groups(zoo, WD, report=gg.analyze(zoo, X), decay_beta=True)


@pytest.mark.parametrize("names, text", [
    ([], ""), (["a"], "'a'"), (["a", "b", "c"], "'a', 'b', 'c'"), (["a", "b", "c", "d"], "'a', 'b', 'c' and 1 more"),
])
def test_some_names_at_most_three(names, text):
    assert groups_module._some(names) == text


def test_group_names_say_decay_and_learning_rate_factor(zoo):
    groups = gg.param_groups(zoo, WD, X, lr_scale={"stream": 0.5, "residual_last": 2.0})
    assert sorted(g["name"] for g in groups) == ["decay", "decay_lr_x2", "no_decay", "no_decay_lr_x0.5"]
    assert {g["name"]: g["weight_decay"] for g in groups}["decay_lr_x2"] == WD
    assert sorted(g["name"] for g in gg.param_groups(zoo, WD, X)) == ["decay", "no_decay"]


def test_a_model_without_norms_warns_once_from_the_callers_line():
    plain = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.warns(UserWarning) as caught:
        groups = gg.param_groups(plain, WD, torch.randn(2, 4))
    [w] = caught
    assert str(w.message) == ("Sequential has no normalization layers: returning plain groups (weights decayed, "
                              "biases and 1-D parameters not)")
    if "mutmut" not in sys.modules:  # under mutation testing a trampoline frame sits between us and it
        assert w.filename == __file__
    decayed = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    assert decayed == {id(plain[0].weight), id(plain[2].weight)}


def test_a_model_with_norms_does_not_warn(zoo):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gg.param_groups(zoo, WD, X)
        gg.param_groups(zoo, WD, report=gg.analyze(zoo, X))
