"""Hard edges of the library: each gives a clear GammaGuideError, or a warning and a sane result."""

from __future__ import annotations

import sys
import warnings

import pytest
import torch
from torch import nn

import gammaguide as gg
from gammaguide.models import create_model

# Every test twice: analyze's default pass on meta tensors, and the real pass (conftest.py).
pytestmark = pytest.mark.usefixtures("forward_pass")


def ids_in(groups: list[dict]) -> list[int]:
    return [id(p) for g in groups for p in g["params"]]


def group_of(groups: list[dict], p: torch.Tensor) -> dict:
    (group,) = [g for g in groups if any(q is p for q in g["params"])]
    return group


def assert_partition(model: nn.Module, groups: list[dict]) -> None:
    """Every trainable parameter in exactly one group."""
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    got = ids_in(groups)
    assert len(got) == len(set(got)) and set(got) == trainable


class MLP(nn.Module):
    def __init__(self, norm: bool = True):
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.bn = nn.BatchNorm1d(8) if norm else nn.Identity()
        self.fc2 = nn.Linear(8, 2)

    def forward(self, x):
        return self.fc2(torch.relu(self.bn(self.fc1(x))))


# -- no normalization layers ----------------------------------------------------------------------


def test_model_without_norms_warns_and_gets_plain_groups():
    model = MLP(norm=False)
    assert gg.analyze(model, torch.randn(2, 4)).entries == ()
    with pytest.warns(UserWarning, match="no normalization layers: returning plain groups"):
        groups = gg.param_groups(model, 1e-4, torch.randn(2, 4))
    assert_partition(model, groups)
    assert group_of(groups, model.fc1.weight)["weight_decay"] == 1e-4
    assert group_of(groups, model.fc1.bias)["weight_decay"] == 0.0


# -- example inputs and forward passes that do not work -------------------------------------------


@pytest.mark.parametrize(
    ("inputs", "described"),
    [
        (torch.randn(2, 5), "float32[2, 5]"),  # wrong shape
        (torch.randn(1, 3, 32, 32, dtype=torch.float64), "float64[1, 3, 32, 32]"),  # wrong dtype
        ((torch.randn(1, 3, 32, 32), torch.randn(1)), "args[1]: float32[1]"),  # one input too many
    ],
)
def test_bad_example_inputs_name_what_was_passed(inputs, described):
    with pytest.raises(gg.GammaGuideError) as info:
        gg.param_groups(create_model("resnet20"), 5e-4, inputs)
    message = str(info.value)
    assert described in message
    assert "forward pass of ResNet failed" in message
    assert "Pass example_inputs with the shape, dtype" in message
    assert info.value.__cause__ is not None  # the original error is kept


def test_integer_inputs_to_a_float_model_are_reported():
    with pytest.raises(gg.GammaGuideError, match=r"int64\[2, 4\]"):
        gg.analyze(MLP(), torch.zeros(2, 4, dtype=torch.long))


def test_forward_that_raises_is_reraised_with_the_original_error():
    class Broken(MLP):
        def forward(self, x):
            self.bn(self.fc1(x))
            raise KeyError("missing feature 'mask'")

    with pytest.raises(gg.GammaGuideError, match="KeyError: \"missing feature 'mask'\"") as info:
        gg.analyze(Broken(), {"x": torch.randn(2, 4)})
    assert "x: float32[2, 4]" in str(info.value)
    assert isinstance(info.value.__cause__, KeyError)


def test_failed_forward_leaves_the_model_as_it_was():
    class Broken(MLP):
        def forward(self, x):
            self.bn(self.fc1(x))
            raise RuntimeError("late failure")

    model = Broken().train()
    mean = model.bn.running_mean.clone()
    with pytest.raises(gg.GammaGuideError):
        gg.analyze(model, torch.randn(8, 4) + 3)
    assert model.training and model.bn.training
    assert torch.equal(model.bn.running_mean, mean)


@pytest.mark.parametrize("returned", [None, "text", {"loss": None, "note": "no tensor"}, 3.0])
def test_forward_returning_nothing_useful(returned):
    class Quiet(MLP):
        def forward(self, x):
            self.bn(self.fc1(x))
            return returned

    with pytest.raises(gg.GammaGuideError, match="returned no tensor"):
        gg.param_groups(Quiet(), 5e-4, torch.randn(2, 4))


def test_missing_example_inputs_for_a_non_image_model():
    with pytest.raises(gg.GammaGuideError, match="example_inputs is required for MLP"):
        gg.analyze(MLP())


# -- parameters the forward pass never reaches ----------------------------------------------------


class WithSpares(MLP):
    """A norm, a linear layer and a free parameter that ``forward`` never uses."""

    def __init__(self):
        super().__init__()
        self.spare_norm = nn.LayerNorm(8)
        self.spare_fc = nn.Linear(8, 8)
        self.spare_scale = nn.Parameter(torch.ones(8))


def test_unreached_parameters_are_grouped_once_and_unused_gammas_not_decayed():
    model = WithSpares()
    report = gg.analyze(model, torch.randn(4, 4))
    assert report.role_of("spare_norm.weight") == "unused"
    groups = gg.param_groups(model, 5e-4, torch.randn(4, 4), report=report)
    assert_partition(model, groups)
    assert group_of(groups, model.spare_norm.weight)["weight_decay"] == 0.0
    assert group_of(groups, model.spare_norm.bias)["weight_decay"] == 0.0
    assert group_of(groups, model.spare_fc.weight)["weight_decay"] == 5e-4  # a weight is a weight
    assert group_of(groups, model.spare_scale)["weight_decay"] == 0.0
    assert [p.name for p in report.others] == ["spare_scale"]


def test_frozen_parameters_are_in_no_group():
    model = WithSpares()
    model.fc1.requires_grad_(False)
    groups = gg.param_groups(model, 5e-4, torch.randn(4, 4))
    assert_partition(model, groups)
    assert id(model.fc1.weight) not in ids_in(groups)


# -- parameters shared between a norm and another module -----------------------------------------


class SharedScale(nn.Module):
    """``fc1.bias`` is the LayerNorm's γ: one tensor, two roles in the code."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 4)
        self.ln = nn.LayerNorm(4)
        self.fc2 = nn.Linear(4, 2)
        self.fc1.bias = self.ln.weight

    def forward(self, x):
        return self.fc2(self.ln(self.fc1(x)) + x)


def test_gamma_shared_with_another_module_is_counted_once_with_a_warning():
    model = SharedScale()
    x = torch.randn(4, 4)
    with pytest.warns(UserWarning, match=r"'fc1.bias' is both a normalization's γ \(ln.weight.*fc1.bias"):
        report = gg.analyze(model, x)
    # The first registered name stands for the tensor; it is a γ with the role of all its uses.
    (entry,) = report.entries
    assert (entry.param_name, entry.module_name, entry.role) == ("fc1.bias", "ln", "residual_last")
    assert [p.kind for p in report.params if p.name == "fc1.bias"] == ["gamma"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        groups = gg.param_groups(model, 5e-4, x)
    assert_partition(model, groups)
    assert group_of(groups, model.ln.weight)["weight_decay"] == 5e-4
    assert "fc1.bias" in str(report)  # listed once, under its first name


class TwoNorms(nn.Module):
    def __init__(self, tied: bool, same_role: bool = False):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.inner = nn.LayerNorm(4)
        self.outer = nn.LayerNorm(4)
        self.same_role = same_role
        if tied:
            self.outer.weight = self.inner.weight

    def forward(self, x):
        if self.same_role:  # both norms end a residual branch
            h = x + self.fc(self.inner(x))
            return self.fc(h + self.fc(self.outer(h)))
        h = self.inner(x)
        return self.fc(self.outer(h + self.fc(h)))


def test_gamma_shared_between_norms_takes_the_strongest_role_and_warns_once_when_their_roles_differ():
    from gammaguide.roles import ROLE_PRIORITY

    x = torch.randn(2, 4)
    untied = gg.analyze(TwoNorms(tied=False), x)
    roles = {"inner": untied.role_of("inner.weight"), "outer": untied.role_of("outer.weight")}
    assert roles == {"inner": "stream", "outer": "head"}  # the two uses disagree
    with pytest.warns(UserWarning) as record:
        tied = gg.analyze(TwoNorms(tied=True), x)
    (entry,) = tied.entries
    assert entry.param_name == "inner.weight"
    assert entry.role == min(roles.values(), key=ROLE_PRIORITY.index) == "stream"
    assert [str(w.message) for w in record] == list(tied.warnings) and len(record) == 1
    assert ("γ 'inner.weight' is shared by 2 normalizations whose outputs have different roles (inner: stream, "
            "outer: head): it takes the strongest, stream, for all of them (not decayed under policy guidelines)"
            ) in tied.warnings[0]


def test_gamma_shared_between_norms_with_one_role_needs_no_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tied = gg.analyze(TwoNorms(tied=True, same_role=True), torch.randn(2, 4))
    assert [(e.param_name, e.role) for e in tied.entries] == [("inner.weight", "residual_last")]


# -- one set of groups, two optimizers ------------------------------------------------------------


def test_each_call_returns_fresh_groups():
    model = MLP()
    first = gg.param_groups(model, 5e-4, torch.randn(2, 4))
    torch.optim.SGD(first, lr=0.1, momentum=0.9)
    assert first[0]["lr"] == 0.1  # torch.optim writes its settings into the dicts...
    second = gg.param_groups(model, 5e-4, torch.randn(2, 4))
    assert all("lr" not in g and "momentum" not in g for g in second)  # ...which a new call does not share
    adam = torch.optim.AdamW(second, lr=1e-3)
    assert [g["lr"] for g in adam.param_groups] == [1e-3] * len(second)


def test_second_optimizer_from_the_same_groups_warns():
    model = MLP()
    groups = gg.param_groups(model, 5e-4, torch.randn(2, 4))
    sgd = torch.optim.SGD(groups, lr=0.1, momentum=0.9)
    with pytest.warns(UserWarning, match="param group 'decay' from gammaguide.param_groups is given to a second "
                                         "optimizer.*lr=0.1") as caught:
        adam = torch.optim.AdamW(groups, lr=1e-3)
    if "mutmut" not in sys.modules:  # under mutation testing a trampoline frame sits between us and it
        # It points at the line that built the second optimizer, not into torch.optim.
        assert {(w.filename, w.lineno) for w in caught} == {(__file__, sys._getframe().f_lineno - 3)}
    assert adam.param_groups[0]["lr"] == 0.1  # what the warning is about
    assert sgd.param_groups[0] is adam.param_groups[0]


def test_ordinary_use_of_one_optimizer_does_not_warn():
    model = MLP()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt = torch.optim.SGD(gg.param_groups(model, 5e-4, torch.randn(2, 4)), lr=0.1, momentum=0.9)
        torch.optim.lr_scheduler.StepLR(opt, 5)
        torch.optim.lr_scheduler.LinearLR(opt)  # a second scheduler also calls setdefault
        model(torch.randn(4, 4)).sum().backward()
        opt.step()
        opt.load_state_dict(opt.state_dict())
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(1))]})


def test_a_param_group_is_built_like_a_dict():
    from gammaguide.groups import ParamGroup

    g = ParamGroup({"params": [1]}, name="decay")
    assert g == {"params": [1], "name": "decay"}


def test_a_users_setdefault_before_the_optimizer_does_not_count_as_an_adoption():
    model = MLP()
    groups = gg.param_groups(model, 5e-4, torch.randn(2, 4))
    for g in groups:
        g.setdefault("momentum", 0.9)  # the user's own default, before any optimizer sees the group
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt = torch.optim.SGD(groups, lr=0.1)
    assert [g["momentum"] for g in opt.param_groups] == [0.9] * len(groups)


def test_a_nameless_param_group_is_named_empty_in_the_warning():
    from gammaguide.groups import ParamGroup

    g = ParamGroup(params=[nn.Parameter(torch.zeros(2))])
    torch.optim.SGD([g], lr=0.1)
    with pytest.warns(UserWarning, match="^param group '' from gammaguide.param_groups is given to a second"):
        torch.optim.AdamW([g], lr=1e-3)
