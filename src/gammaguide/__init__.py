"""gammaguide: weight decay for normalization scales (γ), decided by where each γ sits.

    import gammaguide as gg
    report = gg.analyze(model, example_inputs)          # one traced forward pass
    groups = gg.param_groups(model, weight_decay=5e-4, example_inputs=x)
    opt = torch.optim.SGD(groups, lr=0.1, momentum=0.9)
    monitor = gg.Monitor(model, opt, example_inputs=x)   # per-role |γ|, lr/‖γ‖², var(branch)/var(skip)
"""

from .analysis import analyze
from .errors import GammaGuideError
from .groups import param_groups
from .initialization import zero_init
from .monitor import Monitor
from .norms import register_norm_class
from .optim import create_optimizer
from .policy import POLICIES, Policy
from .report import Entry, ParamInfo, Report
from .roles import PAPER_CATEGORY, ROLES
from .verify import Check, verify

__version__ = "0.1.0"

__all__ = [
    "analyze", "param_groups", "verify", "register_norm_class", "Check", "create_optimizer", "zero_init", "Monitor",
    "Report", "Entry", "ParamInfo", "Policy", "GammaGuideError",
    "ROLES", "POLICIES", "PAPER_CATEGORY", "__version__",
]


def __getattr__(name: str):
    # The Hugging Face helpers import transformers; the core needs torch only (and so does
    # ``from gammaguide import *``: these two are not in __all__).
    if name in ("GammaGuideTrainer", "hf_optimizers"):
        from . import hf

        return getattr(hf, name)
    raise AttributeError(f"module 'gammaguide' has no attribute {name!r}")
