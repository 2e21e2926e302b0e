"""Policies: which parameters get weight decay, from each parameter's kind and γ role."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from .errors import GammaGuideError
from .roles import ROLES

# What a parameter is, for the purpose of weight decay.
KINDS = ("weight", "gamma", "beta", "bias", "other")


@dataclass(frozen=True)
class Policy:
    """Decay decisions: ``gamma`` maps each role to a decision; the rest are per kind.

    ``weight`` covers every parameter with two or more dimensions larger than 1 that is not a γ
    (a C x 1 x 1 layer scale is a vector); ``other`` covers
    1-D parameters that are neither a norm's γ/β nor a bias (layer scale, ReZero α).
    """

    name: str
    gamma: Mapping[str, bool]
    weight: bool = True
    beta: bool = False
    bias: bool = False
    other: bool = False

    def decides(self, kind: str, role: str | None) -> bool:
        if kind == "gamma":
            return bool(self.gamma.get(role or "unused", False))
        return bool(getattr(self, kind))


def _gamma(*decayed: str) -> dict[str, bool]:
    return {r: r in decayed for r in ROLES}


# ``merged`` (a γ whose features are mixed with other features before any norm sees them alone; the
# paper has no category for it) is decayed by ``guidelines``: it is not scale-invariant, but like
# γ_last it sets how much its features count next to the others, and it scales no skip path.
# ``all`` decays it, ``no_norm`` and ``no_gamma`` do not, ``only:merged`` decays it alone.
NAMED_POLICIES: dict[str, Policy] = {
    "guidelines": Policy("guidelines", _gamma("residual_last", "scale_invariant", "merged")),
    "all": Policy("all", _gamma(*ROLES), beta=True, bias=True, other=True),
    "no_norm": Policy("no_norm", _gamma()),
    "no_gamma": Policy("no_gamma", _gamma()),
}
POLICIES = tuple(NAMED_POLICIES) + tuple(f"only:{r}" for r in ROLES if r != "unused")


def resolve_policy(
    spec: str | Mapping[str, bool] | Policy = "guidelines",
    *,
    decay_bias: bool | None = None,
    decay_beta: bool | None = None,
) -> Policy:
    """Turn a policy name, a role->bool mapping or a Policy into a Policy.

    ``decay_bias`` / ``decay_beta`` override the policy's choice for biases and β when given.
    """
    if isinstance(spec, Policy):
        policy = spec
    elif isinstance(spec, str):
        if spec in NAMED_POLICIES:
            policy = NAMED_POLICIES[spec]
        elif spec.startswith("only:") and spec[5:] in ROLES:
            policy = Policy(spec, _gamma(spec[5:]))
        else:
            raise GammaGuideError(
                f"unknown policy {spec!r}; use one of {', '.join(POLICIES)}, or a mapping from role to bool "
                f"with roles from {', '.join(ROLES)}"
            )
    elif isinstance(spec, Mapping):
        bad = [k for k in spec if k not in ROLES]
        if bad:
            raise GammaGuideError(
                f"policy mapping has unknown role(s) {', '.join(map(repr, bad))}; roles are {', '.join(ROLES)}"
            )
        odd = {r: v for r, v in spec.items() if not isinstance(v, bool)}
        if odd:
            raise GammaGuideError(
                f"policy mapping gives {', '.join(f'{r!r} the value {v!r}' for r, v in odd.items())}; map each role "
                f"to True (decay its γ) or False, e.g. {{'stream': False, 'residual_last': True}}"
            )
        policy = Policy("custom", {r: spec.get(r, False) for r in ROLES})
    else:
        raise GammaGuideError(
            f"policy must be a name (e.g. 'guidelines') or a mapping from role to bool, got {type(spec).__name__}"
        )
    for what, value in (("decay_bias", decay_bias), ("decay_beta", decay_beta)):
        if value is not None and not isinstance(value, bool):
            raise GammaGuideError(f"{what} must be True, False or None (the policy decides), got {value!r}")
    if decay_bias is not None or decay_beta is not None:
        policy = Policy(
            policy.name,
            policy.gamma,
            policy.weight,
            policy.beta if decay_beta is None else bool(decay_beta),
            policy.bias if decay_bias is None else bool(decay_bias),
            policy.other,
        )
    return policy
