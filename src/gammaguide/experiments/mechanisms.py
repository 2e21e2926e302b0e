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

from ..analysis import residual_variances
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


@torch.no_grad()
def gamma_stats(rt: RoleTensors, lr: float) -> dict[str, Any]:
    """{"gamma_abs": {role: mean |γ|}, "gamma_eff_lr": {role: mean lr/||γ||²}, "weight_eff_lr": mean
    lr/||W||²}, with ``lr`` the base learning rate (times each group's ``lr_scale``)."""

    def eff_lr(ps: list[nn.Parameter]) -> float:
        vals = [lr * rt.lr_scale.get(id(p), 1.0) / max(float(p.detach().float().pow(2).sum()), 1e-12) for p in ps]
        return sum(vals) / len(vals)

    abs_mean = {}
    eff = {}
    for role, ps in sorted(rt.gammas.items()):
        flat = torch.cat([p.detach().float().abs().flatten() for p in ps])
        abs_mean[role] = float(flat.mean())
        eff[role] = eff_lr(ps)
    return {
        "gamma_abs": abs_mean,
        "gamma_eff_lr": eff,
        "weight_eff_lr": eff_lr(rt.weights) if rt.weights else float("nan"),
    }


def variance_ratios(model: nn.Module, batch: torch.Tensor) -> dict[str, float]:
    """var(branch) / var(skip) at each residual addition, in eval mode on ``batch``.

    ``residual_variances`` runs one traced forward pass and leaves the model's mode and
    BatchNorm statistics exactly as they were.
    """
    out: dict[str, float] = {}
    for rv in residual_variances(model, batch):
        key = rv.module_name or "<model>"
        while key in out:  # two residual adds in one module (a transformer block)
            key += "'"
        out[key] = rv.ratio
    return out
