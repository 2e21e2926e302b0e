"""Policy decisions on their own, without a model: the cases the model-based tests of
test_core_groups.py reach only by chance (found by mutation testing, docs/testing.md)."""

from __future__ import annotations

import pytest

from gammaguide.policy import NAMED_POLICIES, Policy, resolve_policy
from gammaguide.roles import ROLES


def test_the_default_policy_is_guidelines():
    assert resolve_policy() is NAMED_POLICIES["guidelines"]
    assert resolve_policy().name == "guidelines"


@pytest.mark.parametrize("role", [None, "unused"])
def test_a_gamma_without_a_role_counts_as_unused(role):
    # `all` decays every γ, an unused one (no role found) included; `guidelines` does not decay it.
    assert resolve_policy("all").decides("gamma", role) is True
    assert resolve_policy("guidelines").decides("gamma", role) is False
    assert resolve_policy({"unused": True}).decides("gamma", role) is True


def test_a_role_the_mapping_leaves_out_is_not_decayed():
    # A Policy built by hand may name only some roles: the others keep their γ undecayed.
    partial = Policy("partial", {"residual_last": True})
    assert partial.decides("gamma", "residual_last") is True
    for role in ROLES:
        if role != "residual_last":
            assert partial.decides("gamma", role) is False, role
    assert partial.decides("gamma", None) is False


def test_kinds_other_than_gamma_follow_their_fields():
    p = Policy("p", {}, weight=False, beta=True, bias=True, other=False)
    assert [p.decides(k, None) for k in ("weight", "beta", "bias", "other")] == [False, True, True, False]
