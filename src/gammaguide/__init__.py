"""gammaguide: weight decay for normalization scales (γ), decided by where each γ sits.

    import gammaguide as gg
    report = gg.analyze(model, example_inputs)          # one traced forward pass
    groups = gg.param_groups(model, weight_decay=5e-4, example_inputs=x)
    opt = torch.optim.SGD(groups, lr=0.1, momentum=0.9)
"""

from .analysis import analyze
from .errors import GammaGuideError
from .groups import param_groups
from .norms import register_norm_class
from .policy import POLICIES, Policy
from .report import Entry, ParamInfo, Report
from .roles import PAPER_CATEGORY, ROLES
from .verify import Check, verify

__version__ = "0.1.0"

__all__ = [
    "analyze", "param_groups", "verify", "register_norm_class", "Check",
    "Report", "Entry", "ParamInfo", "Policy", "GammaGuideError",
    "ROLES", "POLICIES", "PAPER_CATEGORY", "__version__",
]
