"""Check roles numerically, on a copy of the model in train mode.

- ``scale_invariant``: doubling γ and β must leave the model's output unchanged, because
  the next normalization divides the doubling out. This holds only when every op between
  the two norms is positively homogeneous (ReLU, pooling, conv/linear without bias...);
  otherwise the check is "not_applicable".
- ``residual_last``: zeroing γ and β must turn the residual branch off: the branch input
  of the residual add it reaches is exactly zero. A bias (or another op that does not map
  zero to zero) between the norm and the add makes the check "not_applicable".
- Other roles have no numerical check ("not_applicable").
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .analysis import analyze
from .errors import GammaGuideError
from .inputs import prepare_inputs, unwrap
from .norms import find_norms
from .ops import ADD_OPS, MATMUL_OPS, MUL_OPS, VIEW_OPS
from .roles import Dataflow
from .trace import trace

RESULTS = ("pass", "fail", "not_applicable")

# Ops f with f(2x) = 2 f(x) (for the activation operand).
_HOMOGENEOUS = VIEW_OPS | frozenset({
    "relu", "relu_", "leaky_relu", "leaky_relu_", "max_pool1d", "max_pool2d", "max_pool3d",
    "max_pool2d_with_indices", "max_pool3d_with_indices", "avg_pool1d", "avg_pool2d", "avg_pool3d",
    "adaptive_avg_pool1d", "adaptive_avg_pool2d", "_adaptive_avg_pool2d", "adaptive_avg_pool3d",
    "adaptive_max_pool2d", "mean", "sum", "amax", "max", "cat", "stack", "native_dropout", "dropout",
    "constant_pad_nd", "upsample_nearest2d", "flip", "roll", "index_select", "pixel_shuffle",
})
# Ops that may map zero to something else.
_NOT_ZERO_PRESERVING = frozenset({
    "sigmoid", "exp", "cos", "softmax", "_softmax", "_safe_softmax", "log_softmax", "_log_softmax",
    "hardsigmoid", "elu", "selu", "celu", "softplus", "rsub", "sub", "sub_", "addmm", "baddbmm",
    "_addmm_activation", "clamp_min", "clamp", "hardtanh", "fill", "fill_",
})


@dataclass(frozen=True)
class Check:
    """The numerical check of one γ."""

    param_name: str
    role: str
    result: str  # "pass" | "fail" | "not_applicable"
    detail: str


def _max_abs(t: Any) -> float:
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        return float("nan")
    return float(t.detach().abs().max()) if t.numel() else 0.0


def _relative_error(outs: list[torch.Tensor], refs: list[torch.Tensor]) -> float:
    num = sum(float((o.float() - r.float()).norm() ** 2) for o, r in zip(outs, refs) if r.is_floating_point())
    den = sum(float(r.float().norm() ** 2) for r in refs if r.is_floating_point())
    return (num ** 0.5) / max(den ** 0.5, 1e-30)


class _Probe:
    """The copy under test and its train-mode dataflow."""

    def __init__(self, model: nn.Module, example_inputs: Any, seed: int):
        self.model = model
        self.args, self.kwargs = prepare_inputs(model, example_inputs)
        self.seed = seed
        base = self.run()
        self.graph = base
        self.finding = find_norms(base, model)
        self.flow = Dataflow(base, self.finding)
        self.uses = self.flow.uses()
        self.refs = [t.detach().clone() for t in base.output_tensors]
        self.base_adds = base.add_observations

    def run(self):
        # The same seed for every run, so dropout and drop-path draw the same masks.
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            return trace(self.model, self.args, self.kwargs, observe_adds=_max_abs)

    def path_nodes(self, u: int, stop: set[int]) -> set[int]:
        """Nodes strictly between ``u`` and the nodes in ``stop`` on forward walks from ``u``."""
        flow = self.flow
        reach: set[int] = set()
        stack = [s for s, _ in flow.succ[u]]
        while stack:
            n = stack.pop()
            if n in reach or n in stop or n in flow.norm_name or flow.residual(n) is not None:
                continue
            reach.add(n)
            stack.extend(s for s, _ in flow.succ[n])
        # keep only nodes from which some stop node is reachable
        useful, changed = {n for n in reach if any(s in stop for s, _ in flow.succ[n])}, True
        while changed:
            changed = False
            for n in reach - useful:
                if any(s in useful for s, _ in flow.succ[n]):
                    useful.add(n)
                    changed = True
        return useful

    def _act_inputs(self, n: int) -> int:
        return sum(1 for k in self.graph.ins[n] if self.flow.act[k])

    def homogeneous(self, nodes: set[int]) -> str | None:
        """None if every op is positively homogeneous in its activation input, else the culprit."""
        for n in sorted(nodes):
            name = self.flow.names[n]
            others = len(self.graph.ins[n]) - self._act_inputs(n)
            if name in _HOMOGENEOUS or (name in ("mm", "bmm", "matmul") and others <= 1):
                continue
            if name in ("convolution", "_convolution") and others <= 1:
                continue  # weight only, no bias
            if name in MUL_OPS | {"div", "div_"} and self._act_inputs(n) == 1:
                continue
            if name in ADD_OPS and self._act_inputs(n) == 2 and all(k in nodes for k in self.graph.ins[n]):
                continue
            return f"{name} in {self.flow.name(n)}"
        return None

    def zero_preserving(self, nodes: set[int]) -> str | None:
        for n in sorted(nodes):
            name = self.flow.names[n]
            others = len(self.graph.ins[n]) - self._act_inputs(n)
            if name in _NOT_ZERO_PRESERVING or (name in ADD_OPS and self._act_inputs(n) < 2):
                return f"{name} in {self.flow.name(n)}"
            if name in MATMUL_OPS and others >= 2:
                return f"{name} with a bias in {self.flow.name(n)}"
        return None


def verify(model: nn.Module, example_inputs: Any = None, *, rtol: float = 1e-3, seed: int = 0) -> list[Check]:
    """Check each γ's role numerically on a deep copy of ``model`` in train mode.

    Returns one ``Check`` per γ with result "pass", "fail" or "not_applicable". The model
    itself is not touched.
    """
    inner = unwrap(model)
    if any(p.device.type == "meta" for p in inner.parameters()):
        raise GammaGuideError("verify runs the model on real numbers; it cannot check a model on the meta device. "
                              "Use analyze() for meta models, or build the model on a real device.")
    report = analyze(model, example_inputs, warn=False)
    work = copy.deepcopy(inner).train()
    probe = _Probe(work, example_inputs, seed)
    by_id = {id(p): n for n, p in model.named_parameters()}
    inner_name = {by_id[id(p)]: n for n, p in inner.named_parameters() if id(p) in by_id}
    betas = {g: nm.betas for nm in probe.finding.modules.values() for g in nm.gammas}

    checks = []
    for e in report.entries:
        name = inner_name.get(e.param_name, e.param_name)
        uses = probe.uses.get(name, set())
        if e.role not in ("scale_invariant", "residual_last") or not uses:
            checks.append(Check(e.param_name, e.role, "not_applicable", f"no numerical check for role {e.role}"))
            continue
        params = [work.get_parameter(n) for n in [name, *betas.get(name, [])]]
        events = [(role, n) for u in uses for role, n, _ in probe.flow.events(u)]
        if e.role == "scale_invariant":
            checks.append(_check_scale(probe, e, uses, events, params, rtol))
        else:
            checks.append(_check_zero(probe, e, uses, events, params))
    return checks


def _check_scale(probe: _Probe, e, uses, events, params, rtol) -> Check:
    norms = {n for role, n in events if role == "scale_invariant"}
    culprit = next(filter(None, (probe.homogeneous(probe.path_nodes(u, norms)) for u in uses)), None)
    if culprit:
        return Check(e.param_name, e.role, "not_applicable", f"not positively homogeneous: {culprit}")
    saved = [p.detach().clone() for p in params]
    try:
        with torch.no_grad():
            for p in params:
                p.mul_(2)
        outs = probe.run().output_tensors
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
    err = _relative_error(outs, probe.refs)
    result = "pass" if err <= rtol else "fail"
    return Check(e.param_name, e.role, result, f"doubling γ and β changed the output by {err:.2e} (relative)")


def _check_zero(probe: _Probe, e, uses, events, params) -> Check:
    adds = {n for role, n in events if role == "residual_last"}
    culprit = next(filter(None, (probe.zero_preserving(probe.path_nodes(u, adds)) for u in uses)), None)
    saved = [p.detach().clone() for p in params]
    try:
        with torch.no_grad():
            for p in params:
                p.zero_()
        observed = probe.run().add_observations
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
    branch_max = 0.0
    for n in adds:
        skip = probe.flow.residual(n)[0]
        branch_max = max(branch_max, observed.get(n, (float("nan"),) * 2)[1 - skip])
    if branch_max == 0.0:
        return Check(e.param_name, e.role, "pass", f"zeroing γ and β zeroed the branch input of {len(adds)} residual add(s)")
    if culprit:
        return Check(e.param_name, e.role, "not_applicable", f"branch does not map zero to zero: {culprit}")
    return Check(e.param_name, e.role, "fail", f"branch input stayed non-zero (max |x| = {branch_max:.3g})")
