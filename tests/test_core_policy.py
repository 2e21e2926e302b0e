"""Policy decisions on their own, without a model: the cases the model-based tests of
test_core_groups.py reach only by chance (found by mutation testing, docs/testing.md)."""

from __future__ import annotations

import pytest

from gammaguide.errors import GammaGuideError
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


def test_names_of_resolved_policies():
    assert resolve_policy("only:stream").name == "only:stream"
    assert resolve_policy({"stream": True}).name == "custom"


def test_a_mapping_gives_a_decision_for_every_role():
    # Roles the mapping leaves out are False (not None): records and reports print these values.
    gamma = resolve_policy({"stream": True}).gamma
    assert gamma == {r: r == "stream" for r in ROLES}
    assert all(type(v) is bool for v in gamma.values())


def test_overriding_bias_or_beta_keeps_the_rest_of_the_policy():
    base = resolve_policy("all")
    no_bias = resolve_policy("all", decay_bias=False)
    assert (no_bias.name, no_bias.weight, no_bias.beta, no_bias.bias, no_bias.other) == ("all", True, True, False, True)
    assert no_bias.gamma == base.gamma
    no_beta = resolve_policy("all", decay_beta=False)
    assert (no_beta.name, no_beta.weight, no_beta.beta, no_beta.bias, no_beta.other) == ("all", True, False, True, True)
    kept = resolve_policy("no_gamma", decay_beta=True)
    assert (kept.weight, kept.beta, kept.bias, kept.other) == (True, True, False, False)


def _message(spec, **kw) -> str:
    with pytest.raises(GammaGuideError) as exc:
        resolve_policy(spec, **kw)
    return str(exc.value)


def test_error_messages_list_what_would_have_been_right():
    msg = _message("guideline")
    assert "'guideline'" in msg and "guidelines, all, no_norm, no_gamma, only:residual_last" in msg
    assert "residual_last, scale_invariant, merged" in msg
    msg = _message({"stream": True, "sream": False, "gamma": True})
    assert "'sream', 'gamma'" in msg and "roles are residual_last, scale_invariant, merged" in msg
    msg = _message({"stream": 1, "head": "yes"})
    assert "'stream' the value 1, 'head' the value 'yes'" in msg
    assert "got int" in _message(3)
    assert "decay_beta must be" in _message("all", decay_beta="no")
    assert "decay_bias must be" in _message("all", decay_bias=0)
