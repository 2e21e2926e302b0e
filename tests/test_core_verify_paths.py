"""gg.verify on the ways a branch enters a residual sum, and on forward passes that verify has to
replay op by op: products that add (addcmul, addmm, baddbmm, addbmm, addcdiv) with the γ in either
factor, attention masks made inside forward, a functional norm as the next norm, a branch skipped
when it is zero, and inputs that give a BatchNorm one value per channel."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gammaguide as gg

N, D, L = 6, 8, 5


def check_of(model: nn.Module, x, name: str) -> gg.Check:
    checks = {c.param_name: c for c in gg.verify(model, x)}
    return checks[name]


class AddProduct(nn.Module):
    """``x + (product of the branch and another factor)``, written as one op; the branch is
    ``norm(linear(x))`` and the other factor a fixed matrix (a graph's adjacency) or another
    feature of ``x``."""

    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.fc, self.other = nn.Linear(D, D, bias=False), nn.Linear(D, D, bias=False)
        self.norm = nn.BatchNorm1d(D)
        generator = torch.Generator().manual_seed(0)
        self.register_buffer("adjacency", torch.rand(N, N, generator=generator) + 0.1)
        self.register_buffer("adjacency3", torch.rand(2, N, N, generator=generator) + 0.1)
        self.register_buffer("divisor", torch.rand(N, D, generator=generator) + 0.5)

    def branch(self, x):
        return self.norm(self.fc(x))

    def forward(self, x):
        branch = self.branch(x)
        other = self.other(x)
        if self.how == "addcmul, the branch first":
            return torch.addcmul(x, branch, other)
        if self.how == "addcmul, the branch second":
            return torch.addcmul(x, other, branch)
        if self.how == "addcdiv":
            return torch.addcdiv(x, branch, self.divisor)
        if self.how == "addmm, the branch second":
            return torch.addmm(x, self.adjacency, branch)
        if self.how == "addmm, the branch first":
            return torch.addmm(x, branch, self.other.weight.T)
        if self.how == "baddbmm":
            return torch.baddbmm(x.expand(2, N, D), self.adjacency3, branch.expand(2, N, D))
        if self.how == "addbmm":
            return torch.addbmm(x, self.adjacency3, branch.expand(2, N, D))
        raise AssertionError(self.how)


HOWS = ["addcmul, the branch first", "addcmul, the branch second", "addcdiv", "addmm, the branch second",
        "addmm, the branch first", "baddbmm", "addbmm"]


@pytest.mark.parametrize("how", HOWS)
def test_zeroing_the_gamma_zeroes_the_product_that_enters_the_sum(how):
    """The operand of such a sum is the product, not its first factor: with the γ in the second
    factor the first stays non-zero, and only the product shows the branch switched off."""
    c = check_of(AddProduct(how), torch.randn(N, D), "norm.weight")
    assert (c.role, c.result) == ("residual_last", "pass"), c
    assert c.detail == "zeroing γ and β zeroed its branch of 1 residual sum(s)"


class CoshProduct(AddProduct):
    """The same sums with ``3 cosh`` of the norm's output as the branch factor: zeroing γ and β leaves
    that factor at 3, and the check fails with the largest value of the product that enters the sum."""

    def branch(self, x):
        return torch.cosh(self.norm(self.fc(x))) * 3.0

    def forward(self, x):
        if self.how == "addcmul_, in place":
            return x.clone().addcmul_(self.other(x), self.branch(x))
        if self.how == "addcdiv_, in place":
            return x.clone().addcdiv_(self.branch(x), self.divisor)
        if self.how == "addmv":
            return torch.addmv(x[:, 0], self.branch(x), self.divisor[0])
        return super().forward(x)


def _operand_with_ones(model: CoshProduct, x) -> torch.Tensor:
    """What the sum adds when the branch factor is all threes, computed here op by op."""
    ones, other = torch.full((N, D), 3.0), model.other(x)
    return {
        "addcmul, the branch first": ones * other, "addcmul, the branch second": other * ones,
        "addcmul_, in place": other * ones, "addcdiv": ones / model.divisor, "addcdiv_, in place": ones / model.divisor,
        "addmm, the branch second": model.adjacency @ ones, "addmm, the branch first": ones @ model.other.weight.T,
        "baddbmm": model.adjacency3 @ ones.expand(2, N, D), "addbmm": (model.adjacency3 @ ones.expand(2, N, D)).sum(0),
        "addmv": ones @ model.divisor[0],
    }[model.how]


@pytest.mark.parametrize("how", [*HOWS, "addcmul_, in place", "addcdiv_, in place", "addmv"])
def test_a_branch_that_stays_non_zero_reports_the_product_that_enters_the_sum(how):
    model, x = CoshProduct(how), torch.randn(N, D)
    c = check_of(model, x, "norm.weight")
    assert (c.role, c.result) == ("residual_last", "fail"), c
    with torch.no_grad():
        expected = float(_operand_with_ones(model, x).abs().max())
    assert c.detail == f"its branch stayed non-zero (max |x| = {expected:.3g})"


class SkipsAZeroBranch(nn.Module):
    """Leaves the sum out when its branch is all zero (a data-dependent forward): the pass with
    the γ zeroed never runs the sum the trace saw."""

    def __init__(self):
        super().__init__()
        self.fc, self.norm = nn.Linear(D, D, bias=False), nn.BatchNorm1d(D)

    def forward(self, x):
        branch = self.norm(self.fc(x))
        if bool(branch.abs().sum() == 0):
            return x * 1.0
        return x + branch


def test_a_sum_the_zeroed_pass_never_runs_cannot_be_observed():
    c = check_of(SkipsAZeroBranch(), torch.randn(N, D), "norm.weight")
    assert (c.role, c.result) == ("residual_last", "not_applicable"), c
    assert c.detail == "the branch could not be observed in the train-mode pass"


class CausalBlock(nn.Module):
    """A pre-LN attention block whose causal mask is made inside forward: by a factory with a
    dtype (``torch.ones(..., dtype=torch.bool)``) or by a cast (``.bool()``). Verify replays the
    forward pass op by op, keyword arguments included; without them the mask is a float tensor."""

    def __init__(self, mask: str):
        super().__init__()
        self.mask = mask
        self.norm, self.qkv, self.proj = nn.LayerNorm(D), nn.Linear(D, 3 * D), nn.Linear(D, D)

    def forward(self, x):
        q, k, v = self.qkv(self.norm(x)).chunk(3, -1)
        if self.mask == "factory":
            allowed = torch.ones(L, L, dtype=torch.bool, device=x.device).tril()
        else:
            allowed = x.new_ones(L, L).tril().bool()
        scores = (q @ k.transpose(-1, -2)).masked_fill(~allowed, float("-inf"))
        return x + self.proj(torch.softmax(scores, -1) @ v)


@pytest.mark.parametrize("mask", ["factory", "cast"])
def test_a_mask_made_inside_forward_keeps_its_dtype(mask):
    model = nn.Sequential(CausalBlock(mask), nn.LayerNorm(D), nn.Linear(D, 2))
    c = check_of(model, torch.randn(2, L, D), "0.norm.weight")
    assert (c.role, c.result) == ("residual_last", "not_applicable"), c
    assert c.detail.startswith("branch does not map zero to zero: addmm")  # the biased linears


class FunctionalNext(nn.Module):
    """conv-BN-ReLU-conv, then a norm written with F.layer_norm on parameters of its own: the
    next norm's output is found by replaying ops, not by a module's forward hook."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn = nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.ln_weight, self.ln_bias = nn.Parameter(torch.ones(4, 4, 4)), nn.Parameter(torch.zeros(4, 4, 4))
        self.head = nn.Linear(64, 2)

    def forward(self, x):
        h = self.conv2(F.relu(self.bn(self.conv1(x))))
        return self.head(F.layer_norm(h, (4, 4, 4), self.ln_weight, self.ln_bias).flatten(1))


def test_a_functional_norm_after_the_gamma_divides_it_out():
    c = check_of(FunctionalNext(), torch.randn(4, 3, 4, 4), "bn.weight")
    assert (c.role, c.result) == ("scale_invariant", "pass"), c
    assert c.detail.startswith("doubling γ and β changed the output of the next normalization(s) by ")


class TwoInputs(nn.Module):
    """Normalizes the first sample alone: a BatchNorm in train mode sees one value per channel
    whatever the batch."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, D), nn.Linear(3, D)
        self.bn, self.fc, self.bn2 = nn.BatchNorm1d(D), nn.Linear(D, D, bias=False), nn.BatchNorm1d(D)

    def forward(self, x, y):
        return self.bn2(self.fc(torch.relu(self.bn((self.a(x) + self.b(y))[:1]))))


@pytest.mark.parametrize(("batch", "suggested"), [(1, 2), (3, 6)])
def test_one_value_per_channel_suggests_twice_the_batch_for_every_input(batch, suggested):
    checks = gg.verify(TwoInputs(), (torch.randn(batch, 4), torch.randn(batch, 3)))
    assert [c.result for c in checks] == ["not_applicable", "not_applicable"]
    for c in checks:
        assert (f"sees one value per channel with inputs args[0]: float32[{batch}, 4], args[1]: float32[{batch}, 3]"
                in c.detail)
        assert c.detail.endswith(f"e.g. args[0]: float32[{suggested}, 4], args[1]: float32[{suggested}, 3]")


def test_one_value_per_channel_with_keyword_inputs():
    class Keyword(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.bn = nn.Linear(4, D), nn.BatchNorm1d(D)

        def forward(self, *, features):
            return self.bn(self.fc(features))

    checks = gg.verify(Keyword(), {"features": torch.randn(1, 4)})
    assert [c.result for c in checks] == ["not_applicable"]
    assert checks[0].detail.endswith("e.g. features: float32[2, 4]")


def test_an_error_other_than_one_value_per_channel_is_raised():
    class Broken(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.bn = nn.Linear(4, D), nn.BatchNorm1d(D)

        def forward(self, x):
            h = self.bn(self.fc(x))
            if self.training:
                raise ValueError("only in training")
            return h

    with pytest.raises(ValueError, match="only in training"):
        gg.verify(Broken(), torch.randn(2, 4))


class SandwichAttention(nn.Module):
    """OLMo 2's attention in small: q/k norms, a rotation that negates half the features (as rotary
    embeddings do), attention, then a norm of its output before the residual add."""

    def __init__(self):
        super().__init__()
        self.qkv, self.out = nn.Linear(D, 3 * D, bias=False), nn.Linear(D, D, bias=False)
        self.q_norm, self.k_norm, self.post = nn.RMSNorm(D), nn.RMSNorm(D), nn.RMSNorm(D)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, -1)
        q, k = self.q_norm(q), self.k_norm(k)
        q = torch.cat([-q[..., D // 2:], q[..., :D // 2]], -1)
        return x + self.post(self.out(F.scaled_dot_product_attention(q, k, v)))


def test_a_query_norm_before_attention_is_merged_and_verify_shows_it():
    checks = {c.param_name: c for c in gg.verify(SandwichAttention(), torch.randn(2, L, D))}
    for name in ("q_norm.weight", "k_norm.weight"):
        c = checks[name]
        assert (c.role, c.result) == ("merged", "pass"), c
        assert float(c.detail.split(" by ")[1].split(" ")[0]) > 1e-2
    assert (checks["post.weight"].role, checks["post.weight"].result) == ("residual_last", "pass")


def test_one_value_per_channel_leaves_a_scalar_input_as_it_is():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.bn = nn.Linear(4, D), nn.BatchNorm1d(D)

        def forward(self, x, temperature):
            return self.bn(self.fc(x) / temperature)

    checks = gg.verify(Scaled(), (torch.randn(1, 4), torch.tensor(2.0)))
    assert [c.result for c in checks] == ["not_applicable"]
    assert checks[0].detail.endswith("e.g. args[0]: float32[2, 4], args[1]: float32[]")


def test_a_norm_modules_output_is_scaled_where_it_is_a_floating_point_tensor():
    """verify scales a norm module's output by a hook: every floating-point tensor in it, in tuples
    and lists too; integer tensors and other objects as they are."""
    from gammaguide.verify import _scale_tensors

    ints = torch.tensor([1, 2])
    out = _scale_tensors((torch.ones(2), [torch.full((2,), 2.0), ints], "name", None), 3.0)
    assert isinstance(out, tuple) and isinstance(out[1], list)
    assert torch.equal(out[0], torch.full((2,), 3.0)) and torch.equal(out[1][0], torch.full((2,), 6.0))
    assert out[1][1] is ints and out[2:] == ("name", None)


def test_the_relative_error_is_the_norm_of_all_differences_over_the_norm_of_all_references():
    """What a check's detail reports: sqrt(sum |o - r|^2) / sqrt(sum |r|^2) over every next norm's
    output, small numbers included (no floor at 1); integer outputs are no norm's, and left out."""
    from gammaguide.verify import _relative_error

    refs = [torch.tensor([0.03, 0.04]), torch.tensor([0.0, 0.005]), torch.tensor([1, 2])]
    outs = [torch.tensor([0.03, 0.043]), torch.tensor([0.004, 0.005]), torch.tensor([7, 9])]
    assert _relative_error(outs, refs) == pytest.approx(0.005 / (0.0025 + 0.000025) ** 0.5, rel=1e-5)


class KeywordResidual(nn.Module):
    """Takes its input by keyword only: every pass verify makes calls the copy the same way."""

    def __init__(self):
        super().__init__()
        self.fc1, self.bn1 = nn.Linear(D, D, bias=False), nn.BatchNorm1d(D)
        self.fc2, self.bn2 = nn.Linear(D, D, bias=False), nn.BatchNorm1d(D)

    def forward(self, *, features):
        return features + self.bn2(self.fc2(torch.relu(self.bn1(self.fc1(features)))))


def test_verify_calls_a_keyword_only_model_by_keyword():
    checks = {c.param_name: c for c in gg.verify(KeywordResidual(), {"features": torch.randn(N, D)})}
    assert (checks["bn1.weight"].role, checks["bn1.weight"].result) == ("scale_invariant", "pass")
    assert (checks["bn2.weight"].role, checks["bn2.weight"].result) == ("residual_last", "pass")


class SharedNorm(nn.Module):
    """One BatchNorm module called twice: the γ of ``b`` is divided out by its second call, whose
    output verify must tell from the first's."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Sequential(nn.Linear(D, D, bias=False), nn.BatchNorm1d(D)), nn.Sequential(
            nn.Linear(D, D, bias=False), nn.BatchNorm1d(D))
        self.fa, self.fb, self.shared = nn.Linear(D, D, bias=False), nn.Linear(D, D, bias=False), nn.BatchNorm1d(D)

    def forward(self, x):
        first = self.shared(self.fa(torch.relu(self.a(x))))
        second = self.shared(self.fb(torch.relu(self.b(x))))
        return torch.cat([first, second], 1)


def test_verify_finds_the_second_call_of_a_shared_norm():
    checks = {c.param_name: c for c in gg.verify(SharedNorm(), torch.randn(N, D))}
    for name in ("a.1.weight", "b.1.weight"):
        assert (checks[name].role, checks[name].result) == ("scale_invariant", "pass"), checks[name]
