"""Optimizer parameter groups from an analysis."""

from __future__ import annotations

import math
import os
import sys
import warnings
from numbers import Real
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from .analysis import analyze, check_skip_list, skipped_ids
from .errors import GammaGuideError
from .inputs import unwrap
from .policy import Policy
from .report import Report
from .roles import ROLES


class ParamGroup(dict):
    """A plain parameter-group dict that notices when a second optimizer adopts it.

    ``torch.optim`` stores each optimizer's settings (lr, momentum, ...) in the group dict
    itself with ``setdefault``; a second optimizer built from the same dicts would silently
    inherit the first one's settings and share its learning-rate schedule. Every optimizer
    adopts a group the same way: it assigns ``params``, then fills in its defaults.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._adopting = False
        self._adoptions = 0

    def __setitem__(self, key, value):
        if key == "params":
            self._adopting = True
        super().__setitem__(key, value)

    def setdefault(self, key, default=None):
        if self._adopting:
            self._adopting = False
            self._adoptions += 1
            if self._adoptions > 1:
                warnings.warn(
                    f"param group {self.get('name', '')!r} from gammaguide.param_groups is given to a second "
                    f"optimizer: torch.optim keeps each optimizer's settings in the group dict itself, so this "
                    f"optimizer inherits the first one's (lr={self.get('lr')!r}, ...) and both share one "
                    f"learning-rate schedule. Call gammaguide.param_groups() once per optimizer (every call "
                    f"returns fresh groups).",
                    stacklevel=_stacklevel_outside_torch(),
                )
        return super().setdefault(key, default)


# torch.optim adopts a group several calls deep (Optimizer.__init__, add_param_group, a dynamo
# wrapper): a fixed stacklevel would point into torch. Count frames up to the caller's own code.
_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep


def _stacklevel_outside_torch() -> int:
    """The ``stacklevel`` (counted from the function that calls this one) of the first frame
    outside torch: the user's line that built the optimizer."""
    level, frame = 2, sys._getframe(2)  # stacklevel 2: the caller of the function that warns
    while frame is not None and frame.f_code.co_filename.startswith(_TORCH_DIR):
        level, frame = level + 1, frame.f_back
    return level


def check_rate(what: str, value: Any, hint: str) -> None:
    """A weight decay or learning rate: a finite number >= 0 (not a bool, which Python counts as one)."""
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value) or value < 0:
        raise GammaGuideError(f"{what} must be a finite number >= 0, got {value!r}; pass {hint}")


def _lr_scales(lr_scale: Any) -> dict[str, float]:
    if lr_scale is None:
        return {}
    if not isinstance(lr_scale, Mapping):
        raise GammaGuideError(f"lr_scale must be a mapping from role to a learning-rate factor, got "
                              f"{type(lr_scale).__name__} {lr_scale!r}; pass e.g. lr_scale={{'stream': 0.5}}")
    bad = [r for r in lr_scale if r not in ROLES]
    if bad:
        raise GammaGuideError(f"lr_scale has unknown role(s) {bad}; roles are {', '.join(ROLES)}")
    for role, factor in lr_scale.items():
        check_rate(f"lr_scale[{role!r}]", factor, f"a factor such as lr_scale={{{role!r}: 0.5}}")
    return {r: float(f) for r, f in lr_scale.items()}


def check_report(report: Any, model: nn.Module) -> None:
    """``report=`` must be an analysis of this model: the same parameter names."""
    if not isinstance(report, Report):
        raise GammaGuideError(f"report must be a gammaguide.Report, got {type(report).__name__}; pass "
                              f"report=gammaguide.analyze(model, example_inputs), or leave it out")
    names = [n for n, _ in model.named_parameters()]
    reported = {p.name for p in report.params}
    missing = [n for n in names if n not in reported]
    known = set(names)
    extra = [p.name for p in report.params if p.name not in known]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"it lacks the model's {_some(missing)}")
        if extra:
            parts.append(f"it has {_some(extra)}, which the model lacks")
        raise GammaGuideError(f"report was made from another model ({'; '.join(parts)}); pass "
                              f"report=gammaguide.analyze(model, ...) of this model, or leave it out")


def _some(names: list[str]) -> str:
    return ", ".join(map(repr, names[:3])) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def param_groups(
    model: nn.Module,
    weight_decay: float,
    example_inputs: Any = None,
    policy: str | Mapping[str, bool] | Policy = "guidelines",
    *,
    lr: float | None = None,
    lr_scale: Mapping[str, float] | None = None,
    decay_bias: bool | None = None,
    decay_beta: bool | None = None,
    skip_list: Iterable[str] = (),
    report: Report | None = None,
) -> list[dict]:
    """Parameter groups for any ``torch.optim`` optimizer, following ``policy``.

    One group per distinct (weight_decay, lr) setting; every trainable parameter appears
    exactly once, frozen ones in none. ``lr_scale`` maps a role to a learning-rate
    multiplier for the γ of that role (stored as ``lr_scale``, and as ``lr`` when a base
    ``lr`` is given). Pass ``report`` to reuse an analysis instead of tracing again.
    Each call returns fresh group dicts: build each optimizer from its own call (a group
    given to a second optimizer warns, see ``ParamGroup``).
    """
    check_rate("weight_decay", weight_decay, "e.g. weight_decay=5e-4 (0 for none)")
    if lr is not None:
        check_rate("lr", lr, "e.g. lr=0.1, or leave it out to set it on the optimizer")
    scales = _lr_scales(lr_scale)
    skip_list = check_skip_list(skip_list)
    skip: set[int] = set()
    if report is None:
        report = analyze(model, example_inputs, policy, decay_bias=decay_bias, decay_beta=decay_beta,
                         skip_list=skip_list)
    else:
        check_report(report, model)
        if decay_bias is not None or decay_beta is not None:
            raise GammaGuideError("decay_bias and decay_beta are decided when the report is made: pass them to "
                                  "gammaguide.analyze(), or leave report= out")
        skip = skipped_ids(model, unwrap(model), skip_list) if skip_list else set()
    if not report.entries and not report.warnings:
        # With warnings, analyze has already said which module looked like a normalization and
        # that its parameters are treated as plain weights: one warning per finding.
        warnings.warn(
            f"{type(model).__name__} has no normalization layers: returning plain groups "
            f"(weights decayed, biases and 1-D parameters not)",
            stacklevel=2,
        )

    info = {p.name: p for p in report.params}
    groups: dict[tuple[float, float], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        pi = info[name]
        scale = float(scales.get(pi.role, 1.0)) if pi.kind == "gamma" else 1.0
        decay = pi.decay and id(p) not in skip
        key = (weight_decay if decay else 0.0, scale)
        if key not in groups:
            label = "decay" if decay else "no_decay"
            if scale != 1.0:
                label += f"_lr_x{scale:g}"
            group = ParamGroup(params=[], weight_decay=key[0], name=label)
            if scale != 1.0:
                group["lr_scale"] = scale
            if lr is not None:
                group["lr"] = lr * scale
            groups[key] = group
        groups[key]["params"].append(p)
    return list(groups.values())
