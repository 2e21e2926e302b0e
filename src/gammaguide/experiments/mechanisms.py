"""The paper's two mechanisms, measured on a model during training.

1. Variance control: for every residual addition the trace found, var(branch input) /
   var(skip input) on a fixed batch. L2 on γ_last keeps the branches small against the stream.
2. Effective learning rate: a weight followed by a normalization is scale-invariant, so a step
   of size lr turns it by about lr / ||w||². Per role we record the mean |γ| and the mean of
   lr / ||γ||² over the γ vectors of that role (meaningful for scale-invariant γ), and the same
   quantity for the convolution and linear weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .. import monitor_measures as monitor
from ..report import Report


@dataclass(frozen=True)
class RoleTensors:
    """The γ parameters of each role and the plain weights, looked up once per run."""

    gammas: dict[str, list[nn.Parameter]]
    weights: list[nn.Parameter]
    lr_scale: dict[int, float]  # id(param) -> its group's learning-rate multiplier


def role_tensors(model: nn.Module, report: Report, optimizer: torch.optim.Optimizer) -> RoleTensors:
    params = dict(model.named_parameters())
    gammas: dict[str, list[nn.Parameter]] = {}
    for e in report.entries:
        if e.param_name in params:
            gammas.setdefault(e.role, []).append(params[e.param_name])
    weights = [params[p.name] for p in report.params if p.kind == "weight" and p.name in params]
    lr_scale = {id(p): float(g.get("lr_scale", 1.0)) for g in optimizer.param_groups for p in g["params"]}
    return RoleTensors(gammas, weights, lr_scale)


def gamma_stats(rt: RoleTensors, lr: float) -> dict[str, Any]:
    """{"gamma_abs": {role: mean |γ|}, "gamma_eff_lr": {role: mean lr/||γ||²}, "weight_eff_lr": mean
    lr/||W||²}, with ``lr`` the base learning rate (times each group's ``lr_scale``). Measured by
    the monitor's functions (``gammaguide.monitor_measures``), as ``gg.Monitor`` measures them."""

    def lr_of(p: torch.Tensor) -> float:
        return lr * rt.lr_scale.get(id(p), 1.0)

    stats = monitor.role_stats(dict(sorted(rt.gammas.items())), lr_of)
    return {
        "gamma_abs": {role: s["gamma_abs"] for role, s in stats.items()},
        "gamma_eff_lr": {role: s["eff_lr"] for role, s in stats.items()},
        "weight_eff_lr": monitor.mean_eff_lr(rt.weights, lr_of) if rt.weights else float("nan"),
    }


def variance_ratios(model: nn.Module, batch: torch.Tensor) -> dict[str, float]:
    """var(branch) / var(skip) at each residual addition, in eval mode on ``batch``
    (``gammaguide.monitor_measures.variance_ratios``: one traced forward pass that leaves the model's mode,
    BatchNorm statistics and RNGs exactly as they were)."""
    return monitor.variance_ratios(model, batch)
