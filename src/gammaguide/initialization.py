"""Role-aware initialization: the zero-γ trick for any architecture.

Goyal et al. (2017) start every residual block as the identity by zeroing the γ of the last
BatchNorm of each residual branch; torchvision (``zero_init_residual``) and timm
(``zero_init_last``) implement it by hand, block class by block class. The traced roles
find those γ in any model: they are the ones with role ``residual_last``.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from .analysis import analyze
from .errors import GammaGuideError
from .groups import check_report
from .report import Report
from .roles import ROLES


def zero_init(model: nn.Module, example_inputs: Any = None, role: str = "residual_last", *,
              report: Report | None = None) -> list[str]:
    """Set to zero the γ of every normalization with ``role``; return their parameter names.

    With the default role, each residual branch ending in a normalization then adds exactly
    zero to its stream, as long as the norm's β is zero too (as it is at initialization;
    β is left alone) and no bias lies between the norm and the addition.
    """
    if role not in ROLES:
        raise GammaGuideError(f"unknown role {role!r} for zero_init; roles are {', '.join(ROLES)}")
    if report is None:
        report = analyze(model, example_inputs)
    else:
        check_report(report, model)
    names = [e.param_name for e in report.entries if e.role == role]
    if not names:
        found = sorted({e.role for e in report.entries})
        warnings.warn(
            f"no normalization scale of {type(model).__name__} has role {role!r} (roles found: "
            f"{', '.join(found) or 'none'}); nothing was zeroed",
            stacklevel=2,
        )
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in names:
            params[name].zero_()
    return names
