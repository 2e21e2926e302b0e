"""``create_optimizer``: timm's optimizer factory, fed with guideline parameter groups.

timm's ``create_optimizer_v2`` accepts a list of parameter-group dicts in place of a model
and keeps each group's ``weight_decay``; gammaguide supplies the groups, timm everything
else (the optimizer zoo, its defaults, Lookahead). Without timm, the optimizers that
``torch.optim`` has are built directly, with timm's defaults.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import torch
from torch import nn

from .errors import GammaGuideError
from .groups import param_groups
from .policy import Policy
from .report import Report

# timm name -> torch.optim class and the defaults timm gives it ("sgd" is Nesterov in timm).
_TORCH_OPTIMIZERS: dict[str, tuple[type[torch.optim.Optimizer], dict[str, Any]]] = {
    "sgd": (torch.optim.SGD, {"nesterov": True}),
    "nesterov": (torch.optim.SGD, {"nesterov": True}),
    "momentum": (torch.optim.SGD, {"nesterov": False}),
    "adam": (torch.optim.Adam, {}),
    "adamw": (torch.optim.AdamW, {}),
}

# timm options that build groups from a model; with gammaguide's groups they would be ignored.
_GROUPING_OPTIONS = ("filter_bias_and_bn", "weight_decay_exclude_1d", "layer_decay", "param_group_fn")


def create_optimizer(
    model: nn.Module,
    opt: str = "sgd",
    lr: float | None = None,
    weight_decay: float = 0.0,
    example_inputs: Any = None,
    policy: str | Mapping[str, bool] | Policy = "guidelines",
    *,
    momentum: float = 0.9,
    lr_scale: Mapping[str, float] | None = None,
    skip_list: Iterable[str] = (),
    report: Report | None = None,
    **kwargs: Any,
) -> torch.optim.Optimizer:
    """An optimizer as ``timm.optim.create_optimizer_v2(model, opt, lr, weight_decay, ...)``
    builds it, with weight decay decided per parameter by ``policy``.

    ``opt`` is any timm optimizer name (``sgd``, ``momentum``, ``nesterov``, ``adamw``,
    ``lamb``, ``lion``, ``lookahead_adamw``, ...); further keyword arguments go to the
    optimizer (``betas``, ``eps``, ``foreach``...). Without timm installed, ``sgd``,
    ``nesterov``, ``momentum``, ``adam`` and ``adamw`` come from ``torch.optim``.
    """
    grouping = [k for k in _GROUPING_OPTIONS if k in kwargs]
    if grouping:
        raise GammaGuideError(
            f"create_optimizer decides weight decay per parameter itself, so timm's {', '.join(grouping)} would be "
            f"ignored; drop it, or call timm.optim.create_optimizer_v2 directly for timm's own grouping."
        )
    if not isinstance(opt, str) or not opt:
        raise GammaGuideError(f"opt must be an optimizer name such as 'sgd' or 'adamw', got {opt!r}")
    groups = param_groups(model, weight_decay, example_inputs, policy, lr=lr, lr_scale=lr_scale,
                          skip_list=skip_list, report=report)
    try:
        from timm.optim import create_optimizer_v2, list_optimizers
    except ImportError:
        return _torch_optimizer(groups, opt.lower(), lr, weight_decay, momentum, kwargs)
    name = opt.lower().split("_")[-1]
    if name not in list_optimizers():
        raise GammaGuideError(f"timm has no optimizer {opt!r}; choose one of timm.optim.list_optimizers()")
    return create_optimizer_v2(groups, opt, lr=lr, weight_decay=weight_decay, momentum=momentum, **kwargs)


def _torch_optimizer(groups: list[dict], opt: str, lr: float | None, weight_decay: float, momentum: float,
                     kwargs: dict[str, Any]) -> torch.optim.Optimizer:
    if opt not in _TORCH_OPTIMIZERS:
        raise GammaGuideError(
            f"optimizer {opt!r} needs timm (pip install timm); without it create_optimizer builds "
            f"{', '.join(_TORCH_OPTIMIZERS)} from torch.optim"
        )
    cls, defaults = _TORCH_OPTIMIZERS[opt]
    options = {**defaults, "weight_decay": weight_decay, **kwargs}
    if cls is torch.optim.SGD:
        options.setdefault("momentum", momentum)
    if lr is not None:
        options["lr"] = lr
    return cls(groups, **options)
