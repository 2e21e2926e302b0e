"""Typed results of an analysis and their plain-text and JSON forms."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from .roles import ROLES, ResidualAdd


@dataclass(frozen=True)
class Entry:
    """One normalization scale (γ) and what the active policy does with it."""

    param_name: str  # as in model.named_parameters()
    module_name: str
    norm_type: str
    role: str
    paper_category: str | None
    decay: bool
    reason: str


@dataclass(frozen=True)
class ParamInfo:
    """Every parameter of the model: what it is and whether the policy decays it."""

    name: str
    kind: str  # "weight" | "gamma" | "beta" | "bias" | "other"
    role: str | None  # for γ only
    decay: bool
    shape: tuple[int, ...]
    trainable: bool


@dataclass(frozen=True)
class Report:
    """What ``gammaguide.analyze`` found. ``entries`` holds one item per γ."""

    entries: tuple[Entry, ...]
    params: tuple[ParamInfo, ...]
    residual_adds: tuple[ResidualAdd, ...]
    warnings: tuple[str, ...]
    policy: str
    input_shapes: tuple[str, ...] = field(default=())
    # "meta": the forward pass ran on shapes alone; "real": it needed values, so it ran for real.
    traced_on: str = "real"

    @property
    def others(self) -> tuple[ParamInfo, ...]:
        """1-D parameters that are neither a γ, a β nor a bias (layer scale, ReZero α...)."""
        return tuple(p for p in self.params if p.kind == "other")

    def by_role(self) -> dict[str, list[Entry]]:
        out: dict[str, list[Entry]] = {r: [] for r in ROLES}
        for e in self.entries:
            out[e.role].append(e)
        return out

    def counts(self) -> dict[str, int]:
        return {r: len(es) for r, es in self.by_role().items()}

    def decisions(self) -> dict[str, bool]:
        """Parameter name -> decayed, for every parameter."""
        return {p.name: p.decay for p in self.params}

    def role_of(self, param_name: str) -> str | None:
        for e in self.entries:
            if e.param_name == param_name:
                return e.role
        return None

    def to_dict(self) -> dict:
        return {
            "policy": self.policy,
            "input_shapes": list(self.input_shapes),
            "traced_on": self.traced_on,
            "counts": self.counts(),
            "entries": [asdict(e) for e in self.entries],
            "others": [p.name for p in self.others],
            "residual_adds": [
                {"module_name": r.module_name, "skip_arg": r.skip_arg, "branch_weighted_ops": r.branch_weighted,
                 "skip_weighted_ops": r.skip_weighted}
                for r in self.residual_adds
            ],
            "params": [asdict(p) for p in self.params],
            "warnings": list(self.warnings),
        }

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    def __str__(self) -> str:
        lines = [f"gammaguide report ({len(self.entries)} normalization scales, policy {self.policy})"]
        width = max((len(e.param_name) for e in self.entries), default=10)
        for role, entries in self.by_role().items():
            if not entries:
                continue
            decay = {e.decay for e in entries}
            verdict = "decay" if decay == {True} else "no decay" if decay == {False} else "mixed"
            lines.append(f"\n{role} ({len(entries)}): {verdict}")
            for e in entries:
                lines.append(f"  {e.param_name:<{width}}  {e.norm_type:<14} {e.reason}")
        if self.others:
            lines.append("\nother 1-D parameters (not γ, β or bias): " + ", ".join(p.name for p in self.others))
        for w in self.warnings:
            lines.append(f"warning: {w}")
        return "\n".join(lines)
