"""Optimizer parameter groups from an analysis."""

from __future__ import annotations

import warnings
from typing import Any, Iterable, Mapping

from torch import nn

from .analysis import analyze
from .errors import GammaGuideError
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
                    stacklevel=3,
                )
        return super().setdefault(key, default)


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
    if not isinstance(weight_decay, (int, float)) or weight_decay < 0:
        raise GammaGuideError(f"weight_decay must be a number >= 0, got {weight_decay!r}")
    scales = dict(lr_scale or {})
    bad = [r for r in scales if r not in ROLES]
    if bad:
        raise GammaGuideError(f"lr_scale has unknown role(s) {bad}; roles are {', '.join(ROLES)}")
    if report is None:
        report = analyze(model, example_inputs, policy, decay_bias=decay_bias, decay_beta=decay_beta,
                         skip_list=skip_list)
    if not report.entries:
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
        pi = info.get(name)
        if pi is None:
            raise GammaGuideError(
                f"parameter '{name}' is not in the report; pass a report made from this same model"
            )
        scale = float(scales.get(pi.role, 1.0)) if pi.kind == "gamma" else 1.0
        key = (weight_decay if pi.decay else 0.0, scale)
        if key not in groups:
            label = "decay" if pi.decay else "no_decay"
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
