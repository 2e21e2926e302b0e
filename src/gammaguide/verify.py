"""Check roles numerically, on a private copy of the model in train mode.

- ``scale_invariant``: doubling γ and β must leave the model's output unchanged, because the
  next normalization divides the doubling out. This holds only when every op between the two
  norms is positively homogeneous (ReLU, pooling, conv/linear without bias...); otherwise the
  check is "not_applicable".
- ``merged``: doubling γ and β must change the output (its features are mixed with others before
  a norm could divide the doubling out), on the same homogeneous paths (the mixing itself aside:
  sums with other features, sigmoid and softmax gates, attention).
- ``residual_last``: zeroing γ and β must switch its own contribution to each residual sum off:
  the elements of the branch operand that carry this γ are exactly zero (the other branches of a
  sum of several are not its business). A bias (or another op that does not map zero to zero)
  on the way, or a branch where this γ's features are mixed with others, makes the check
  "not_applicable".
- Other roles have no numerical check ("not_applicable").

Two things would make a check meaningless rather than wrong, and the copy is set up against
them: a normalization's ``eps`` breaks the invariance by about eps / variance, which dominates
where activations are small (late layers at small input sizes), so the copy's norms get an eps
of 1e-30 (float32 and float64 models); and BatchNorm in train mode needs more than one value per
channel, so when the inputs give a norm a single one every check is "not_applicable" with an
input size that works.
"""

from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

from .analysis import analyze
from .channels import ALL, SDPA_PREFIXES, SQUASHING, Part
from .errors import GammaGuideError
from .inputs import default_input_size, describe_inputs, prepare_inputs, unwrap
from .norms import find_norms
from .ops import ADD_OPS, MATMUL_OPS, MUL_OPS, SUM_OPS, VIEW_OPS
from .roles import Dataflow
from .trace import LEAF_KINDS, _iter_tensors, _no_fused_fast_paths, makes_constants, trace

RESULTS = ("pass", "fail", "not_applicable")

# Ops f with f(2x) = 2 f(x) (for the activation operand).
_HOMOGENEOUS = VIEW_OPS | frozenset({
    "relu", "relu_", "leaky_relu", "leaky_relu_", "max_pool1d", "max_pool2d", "max_pool3d",
    "max_pool2d_with_indices", "max_pool3d_with_indices", "avg_pool1d", "avg_pool2d", "avg_pool3d",
    "adaptive_avg_pool1d", "adaptive_avg_pool2d", "_adaptive_avg_pool2d", "adaptive_avg_pool3d",
    "adaptive_max_pool2d", "mean", "sum", "amax", "max", "cat", "stack", "native_dropout", "dropout",
    "constant_pad_nd", "upsample_nearest2d", "flip", "roll", "index_select", "pixel_shuffle", "index",
    "channel_shuffle", "native_channel_shuffle", "upsample_bilinear2d", "_upsample_bilinear2d_aa",
    "upsample_nearest1d", "upsample_nearest3d", "_unsafe_index", "neg",
})
# Ops that may map zero to something else.
_NOT_ZERO_PRESERVING = frozenset({
    "sigmoid", "exp", "cos", "softmax", "_softmax", "_safe_softmax", "log_softmax", "_log_softmax",
    "hardsigmoid", "elu", "selu", "celu", "softplus", "rsub", "addmm", "baddbmm",
    "_addmm_activation", "clamp_min", "clamp", "hardtanh", "fill", "fill_",
})
_EPS_ATTRIBUTES = ("eps", "variance_epsilon", "epsilon")
_NO_EPS = 1e-30


@dataclass(frozen=True)
class Check:
    """The numerical check of one γ."""

    param_name: str
    role: str
    result: str  # "pass" | "fail" | "not_applicable"
    detail: str


def _relative_error(outs: list[torch.Tensor], refs: list[torch.Tensor]) -> float:
    pairs = [(o, r) for o, r in zip(outs, refs, strict=True) if r.is_floating_point() and o.shape == r.shape]
    num = sum(float((o.float() - r.float()).norm() ** 2) for o, r in pairs)
    den = sum(float(r.float().norm() ** 2) for _, r in pairs)
    return (num ** 0.5) / max(den ** 0.5, 1e-30)


def _without_eps(model: nn.Module) -> None:
    """Set the eps of every normalization-like module of the private copy to 1e-30, so that
    doubling γ and β is divided out exactly (eps alone would break it by eps / variance)."""
    dtypes = {p.dtype for p in model.parameters()} | {b.dtype for b in model.buffers() if b.is_floating_point()}
    if not dtypes or not dtypes <= {torch.float32, torch.float64}:
        return  # 1e-30 is not a number in half precision
    for m in model.modules():
        for attr in _EPS_ATTRIBUTES:
            value = getattr(m, attr, None)
            if isinstance(value, float) and 0 < value < 1:
                setattr(m, attr, _NO_EPS)


class _Enough(Exception):
    """Raised to end a forward pass once every op a check looks at has run."""


class _Capture(TorchDispatchMode):
    """Keeps, by the ops' order of execution, the tensor arguments of some ops and the result of
    others (at least one op), and ends the forward pass after the last of them."""

    def __init__(self, arguments: set[int], results: set[int]):
        super().__init__()
        self.arguments, self.results, self.count = arguments, results, 0
        self.last = max(arguments | results)
        self.kept: dict[int, list[torch.Tensor]] = {}
        self.out: dict[int, torch.Tensor] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if makes_constants(func):  # no node of the traced graph: not counted, as the tracer does not
            return func(*args, **(kwargs or {}))
        k = self.count
        self.count += 1
        if k in self.arguments:
            self.kept[k] = [t.detach().clone() for t in _iter_tensors((args, kwargs or {}))]
        out = func(*args, **(kwargs or {}))
        if k in self.results:
            first = next(_iter_tensors(out), None)
            if first is not None:
                self.out[k] = first.detach().clone()
        if k >= self.last:
            raise _Enough
        return out


class _Probe:
    """The copy under test and its train-mode dataflow."""

    def __init__(self, model: nn.Module, example_inputs: Any, seed: int):
        self.model = model
        self.args, self.kwargs = prepare_inputs(model, example_inputs)
        self.seed = seed
        graph = self.graph = self._traced()
        self.finding = find_norms(graph, model)
        self.df = Dataflow(graph, self.finding)
        self.flow, self.sums = self.df.flow, self.df.sums
        self.uses = self.df.uses()
        # The order of execution of every op node (leaves and split pieces are no ops).
        self.order: dict[int, int] = {}
        for i, op in enumerate(graph.ops):
            if not isinstance(op, str):
                self.order[i] = len(self.order)
        # Each module call's number among the calls of its module, to find it again by hooks.
        self.nth: dict[int, int] = {}
        counts: dict[int, int] = {}
        for c, call in enumerate(graph.calls):
            self.nth[c] = counts.get(id(call.module), 0)
            counts[id(call.module)] = self.nth[c] + 1
        self.norm_outputs = self.run(results=set(self.flow.norm_name))[1]  # the reference

    def _traced(self):
        # The same seed for every run, so that dropout and drop-path draw the same masks.
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            return trace(self.model, self.args, self.kwargs)

    def run(self, arguments: set[int] = frozenset(), results: set[int] = frozenset()):
        """One forward pass, as far as needed: the tensor arguments of the op nodes ``arguments``
        and the result of the op nodes ``results``, by node."""
        if not arguments and all(n in self.flow.norm_call for n in results):
            return {}, self._module_outputs(results)
        mode = _Capture({self.order[n] for n in arguments if n in self.order},
                        {self.order[n] for n in results if n in self.order})
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=[]), _no_fused_fast_paths(), mode:
                torch.manual_seed(self.seed)
                self.model(*self.args, **self.kwargs)
        except _Enough:
            pass
        by_order = {o: n for n, o in self.order.items()}
        return ({by_order[o]: v for o, v in mode.kept.items()}, {by_order[o]: v for o, v in mode.out.items()})

    def _module_outputs(self, norms: set[int]) -> dict[int, torch.Tensor]:
        """The outputs of the normalization module calls ``norms``, by forward hooks: a plain
        forward pass, without a dispatch mode's cost on every op."""
        calls = self.graph.calls
        wanted = {(id(calls[self.flow.norm_call[n]].module), self.nth[self.flow.norm_call[n]]): n for n in norms}
        seen: dict[int, int] = {}
        out: dict[int, torch.Tensor] = {}

        def hook(module, args, output):
            k = seen.get(id(module), 0)
            seen[id(module)] = k + 1
            node = wanted.get((id(module), k))
            if node is not None:
                first = next(_iter_tensors(output), None)
                if first is not None:
                    out[node] = first.detach().clone()
                if len(out) == len(wanted):
                    raise _Enough

        modules = {id(calls[self.flow.norm_call[n]].module): calls[self.flow.norm_call[n]].module for n in norms}
        handles = [m.register_forward_hook(hook) for m in modules.values()]
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=[]), _no_fused_fast_paths():
                torch.manual_seed(self.seed)
                self.model(*self.args, **self.kwargs)
        except _Enough:
            pass
        finally:
            for h in handles:
                h.remove()
        return out

    def path_nodes(self, u: int, stop: set[int]) -> set[int]:
        """Nodes strictly between ``u`` and the nodes in ``stop`` on forward walks from ``u``."""
        flow, sums = self.flow, self.sums
        reach: set[int] = set()
        stack = [s for s, _ in flow.succ[u]]
        while stack:
            n = stack.pop()
            if n in reach or n in stop or n in flow.norm_name or sums.member(n) is not None:
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

    def inside_after(self, u: int, gamma: str) -> set[int]:
        """The ops of normalization ``u``'s own call that run after it applies ``gamma``: an
        activation fused into the norm module (timm's ``BatchNormAct2d``) acts on the γ's output."""
        call = self.flow.norm_call.get(u)
        if call is None:
            return set()
        c = self.graph.calls[call]
        root, ins, names = self.flow.root, self.graph.ins, self.flow.names
        first = next((i for i in range(c.start, c.end) if any(root[k] == gamma for k in ins[i])), None)
        if first is None:
            return set()
        return {i for i in range(first + 1, c.end) if names[i] not in LEAF_KINDS and self.flow.act[i]
                and root[i] is None}

    def _act_inputs(self, n: int) -> int:
        return sum(1 for k in self.graph.ins[n] if self.flow.act[k])

    def homogeneous(self, nodes: set[int], u: int, mixing_allowed: bool = False) -> str | None:
        """None if every op is positively homogeneous in its activation input, else the culprit.
        ``u``: the normalization the walk starts from (a product with an activation off the path,
        which the γ does not reach but through another norm, scales by a constant).
        ``mixing_allowed``: sums with other features, and gates (a sigmoid or softmax multiplying
        other features), count as homogeneous (for ``merged``)."""
        names, rep = self.flow.names, self.flow.rep
        for n in sorted(nodes):
            name = names[n]
            others = len(self.graph.ins[n]) - self._act_inputs(n)
            if name in _HOMOGENEOUS or (name in ("mm", "bmm", "matmul") and others <= 1):
                continue
            if name in ("convolution", "_convolution") and others <= 1:
                continue  # weight only, no bias
            if name in MUL_OPS | {"div", "div_"} and (self._act_inputs(n) == 1 or sum(
                    1 for k in self.graph.ins[n] if rep[k] in nodes or rep[k] == u) == 1):
                continue
            if name in ADD_OPS and self._act_inputs(n) == 2 and all(k in nodes for k in self.graph.ins[n]):
                continue
            if mixing_allowed and name in SUM_OPS and self._act_inputs(n) == len(self.graph.ins[n]):
                continue
            if mixing_allowed and (name in SQUASHING or name in MUL_OPS or name.startswith(SDPA_PREFIXES)):
                continue  # a gate (attention: the γ in its queries or keys sets the softmax's temperature)
            if name.startswith(SDPA_PREFIXES) and self._values_only(n, nodes, u):
                continue  # attention is linear in its values
            return f"{name} in {self.flow.name(n)}"
        return None

    def _on_path(self, k: int, nodes: set[int], u: int) -> bool:
        return self.flow.rep[k] in nodes or self.flow.rep[k] == u

    def _values_only(self, n: int, nodes: set[int], u: int) -> bool:
        """Attention node ``n`` gets the γ in its values and not in its queries or keys."""
        ins = self.graph.ins[n]
        return len(ins) > 2 and self._on_path(ins[2], nodes, u) and not any(self._on_path(k, nodes, u) for k in ins[:2])

    def zero_preserving(self, nodes: set[int], u: int) -> str | None:
        names = self.flow.names
        for n in sorted(nodes):
            name = names[n]
            if name.startswith(SDPA_PREFIXES):
                if len(self.graph.ins[n]) > 2 and self._on_path(self.graph.ins[n][2], nodes, u):
                    continue  # zero values give a zero output, whatever the weights
                return f"{name} (zero queries or keys attend uniformly) in {self.flow.name(n)}"
            others = len(self.graph.ins[n]) - self._act_inputs(n)
            ins = self.graph.ins[n]
            # A sum with something other than activations: a bias, a buffer, or a number (``1 + scale``).
            if name in _NOT_ZERO_PRESERVING or (name in SUM_OPS and (self._act_inputs(n) < len(ins) or len(ins) < 2)):
                return f"{name} in {self.flow.name(n)}"
            if name in MATMUL_OPS and others >= 2:
                return f"{name} with a bias in {self.flow.name(n)}"
        return None


def _random_default(model: nn.Module, example_inputs: Any, seed: int) -> Any:
    """Without example inputs, an image model gets a batch of two random images of its default
    size: analyze's default zero image would give every normalization constant channels, where
    no doubling or zeroing can show anything."""
    if example_inputs is not None:
        return example_inputs
    size = default_input_size(model)
    if size is None:
        return None  # prepare_inputs says what to pass
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn((2, *size), generator=generator)
    return x.to(param.device, param.dtype) if param is not None else x


def _single_value_per_channel(exc: BaseException) -> bool:
    return isinstance(exc, ValueError) and "more than 1 value per channel" in str(exc)


def _larger_input(args: tuple, kwargs: dict) -> str:
    """An input description with twice the batch, for a norm that saw one value per channel."""
    shapes = describe_inputs(args, kwargs)
    out = []
    for s in shapes:
        head, _, dims = s.rpartition("[")
        sizes = dims.rstrip("]").split(", ")
        if sizes and sizes[0].isdigit():
            sizes[0] = str(max(2, 2 * int(sizes[0])))
        out.append(f"{head}[{', '.join(sizes)}]")
    return ", ".join(out)


def verify(model: nn.Module, example_inputs: Any = None, *, rtol: float = 1e-3, seed: int = 0) -> list[Check]:
    """Check each γ's role numerically on a deep copy of ``model`` in train mode.

    Returns one ``Check`` per γ with result "pass", "fail" or "not_applicable". The model
    itself is not touched.
    """
    inner = unwrap(model)
    if any(p.device.type == "meta" for p in inner.parameters()):
        raise GammaGuideError("verify runs the model on real numbers; it cannot check a model on the meta device. "
                              "Use analyze() for meta models, or build the model on a real device.")
    if isinstance(inner, torch.jit.ScriptModule) or _mode_fixed(inner):
        what = "TorchScript" if isinstance(inner, torch.jit.ScriptModule) else "torch.export"
        raise GammaGuideError(f"verify runs a copy of the model in train mode with γ, β and eps changed; a {what} "
                              f"module fixes its mode and constants when it is made. Verify the eager model it was "
                              f"made from (analyze() works on either, with the same roles).")
    devices = {"cpu", "cuda"} | {p.device.type for p in inner.parameters()}
    with contextlib.ExitStack() as stack:
        # Checks of exact zeros and of ratios need full precision; a caller's autocast region would also
        # cache weight casts from one pass to the next, so that their ops no longer line up.
        for device in devices:
            if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
                stack.enter_context(torch.autocast(device, enabled=False))
        return _verify(model, inner, example_inputs, rtol, seed)


def _mode_fixed(module: nn.Module) -> bool:
    """A module of ``torch.export`` (``ExportedProgram.module()``): its train and eval raise."""
    return "train" in vars(module) and isinstance(module, torch.fx.GraphModule)


def _verify(model: nn.Module, inner: nn.Module, example_inputs: Any, rtol: float, seed: int) -> list[Check]:
    example_inputs = _random_default(inner, example_inputs, seed)
    report = analyze(model, example_inputs, warn=False)
    work = copy.deepcopy(inner).train()
    _without_eps(work)
    try:
        probe = _Probe(work, example_inputs, seed)
    except Exception as exc:  # noqa: BLE001 - a train-mode pass that fails is reported, not raised
        if not _single_value_per_channel(exc):
            raise
        args, kwargs = prepare_inputs(work, example_inputs)
        given = ", ".join(describe_inputs(args, kwargs))
        why = (f"a BatchNorm in train mode sees one value per channel with inputs {given}, so nothing can be "
               f"normalized; verify with more values per channel, e.g. {_larger_input(args, kwargs)}")
        return [Check(e.param_name, e.role, "not_applicable", why) for e in report.entries]
    by_id = {id(p): n for n, p in model.named_parameters()}
    inner_name = {by_id[id(p)]: n for n, p in inner.named_parameters() if id(p) in by_id}
    betas = {g: nm.betas for nm in probe.finding.modules.values() for g in nm.gammas}
    owner = {g: nm.module for nm in probe.finding.modules.values() for g in nm.gammas}
    betas.update({g: [b] for g, b in probe.finding.functional.values() if g is not None and b is not None})

    checks = []
    for e in report.entries:
        name = inner_name.get(e.param_name, e.param_name)
        uses = probe.uses.get(name, set())
        if e.role not in ("scale_invariant", "residual_last", "merged") or not uses:
            checks.append(Check(e.param_name, e.role, "not_applicable", f"no numerical check for role {e.role}"))
            continue
        params = [work.get_parameter(n) for n in [name, *betas.get(name, [])]]
        events = [ev for u in sorted(uses) for ev in probe.df.events(u)]
        inside = {u: probe.inside_after(u, name) for u in uses}
        module = owner.get(name)
        if e.role == "residual_last":
            checks.append(_check_zero(probe, e, uses, inside, events, params, module))
        else:
            checks.append(_check_scale(probe, e, uses, inside, events, params, module, rtol))
    return checks


def _changed(probe: _Probe, params, module: nn.Module | None, factor: float, **run):
    """``probe.run(**run)`` with the normalization's output multiplied by ``factor`` (zero: zeroed).
    A norm module's output is scaled by a forward hook, which is what scaling γ and β does
    whatever their parametrization (Gemma's ``x * (1 + w)``, weight norm); a functional norm's
    γ and β are scaled in place."""
    if module is not None:
        def hook(mod, args, output):
            with _disable_current_modes():  # unseen by _Capture, which counts ops to find them
                return _scale_tensors(output, factor)

        handle = module.register_forward_hook(hook)
        try:
            return probe.run(**run)
        finally:
            handle.remove()
    saved = [p.detach().clone() for p in params]
    try:
        with torch.no_grad():
            for p in params:
                p.mul_(factor)
        return probe.run(**run)
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved, strict=True):
                p.copy_(s)


def _scale_tensors(obj: Any, factor: float) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj * factor if obj.is_floating_point() else obj
    if isinstance(obj, tuple):
        return tuple(_scale_tensors(o, factor) for o in obj)
    if isinstance(obj, list):
        return [_scale_tensors(o, factor) for o in obj]
    return obj


def _check_scale(probe: _Probe, e, uses, inside, events, params, module, rtol) -> Check:
    merged = e.role == "merged"
    norms = {ev.node for ev in events if ev.role in ("scale_invariant", "merged")}
    if not norms:
        return Check(e.param_name, e.role, "not_applicable", "the train-mode pass reaches no other normalization")
    culprit = next(filter(None, (probe.homogeneous(inside[u] | probe.path_nodes(u, norms), u, merged) for u in uses)),
                   None)
    if culprit:
        return Check(e.param_name, e.role, "not_applicable", f"not positively homogeneous: {culprit}")
    # Every walk from the γ ends at these norms, so the output depends on it only through theirs.
    outs = _changed(probe, params, module, 2.0, results=norms)[1]
    stops = sorted(outs)
    err = _relative_error([outs[n] for n in stops], [probe.norm_outputs[n] for n in stops])
    if merged:
        result = "pass" if err > rtol else "fail"
        return Check(e.param_name, e.role, result, f"doubling γ and β changed the output of the next "
                                                   f"normalization(s) by {err:.2e} (relative); a scale-invariant γ "
                                                   f"would leave it as it was")
    result = "pass" if err <= rtol else "fail"
    return Check(e.param_name, e.role, result, f"doubling γ and β changed the output of the next normalization(s) "
                                               f"by {err:.2e} (relative)")


def _mask_tensor(mask, shape: torch.Size) -> torch.Tensor | None:
    """The elements of a tensor of ``shape`` in ``mask`` (None: every element)."""
    if mask is ALL or mask is None:
        return None
    assert isinstance(mask, Part)
    n = math.prod(mask.sizes)
    flat = torch.tensor([(mask.bits >> k) & 1 for k in range(n)], dtype=torch.bool).reshape(mask.sizes)
    view = [1] * len(shape)
    for d, size in zip(mask.dims, mask.sizes, strict=True):
        view[len(shape) + d] = size
    return flat.reshape(view).expand(shape)


def _operand_max(probe: _Probe, kept: dict[int, list[torch.Tensor]], s, index: int, mask) -> float:
    """max |x| over the elements in ``mask`` of operand ``index`` of sum ``s`` (NaN: not seen)."""
    o = s.operands[index]
    values = kept.get(o.node)
    if values is None or o.pos >= len(values):
        return float("nan")
    t = values[o.pos].float()
    name = probe.flow.names[o.node]
    if o.pos == 1 and len(values) > 2:  # the product of two arguments is the operand
        if name in ("addcmul", "addcmul_"):
            t = t * values[2].float()
        elif name in ("addcdiv", "addcdiv_"):
            t = t / values[2].float()
        elif name in ("addmm", "addmv"):
            t = t @ values[2].float()
        elif name in ("baddbmm", "addbmm"):
            t = (t @ values[2].float()).sum(0) if name == "addbmm" else t @ values[2].float()
    chosen = _mask_tensor(mask, t.shape)
    t = t.abs() if chosen is None else t.abs()[chosen]
    return float(t.max()) if t.numel() else 0.0


def _check_zero(probe: _Probe, e, uses, inside, events, params, module) -> Check:
    ends = [ev for ev in events if ev.role == "residual_last"]
    if not ends:
        return Check(e.param_name, e.role, "not_applicable", "the train-mode pass reaches no residual sum")
    if any(ev.reach[1] is not None for ev in ends):
        return Check(e.param_name, e.role, "not_applicable",
                     "its features are mixed with others before the sum, so zeroing it cannot zero the branch")
    if any(probe.flow.names[probe.sums.member(ev.node).operands[ev.operand].node] in ("lerp", "lerp_")
           for ev in ends):
        return Check(e.param_name, e.role, "not_applicable",
                     "a lerp adds w * (end - start): zeroing the end does not remove that branch")
    adds = {probe.sums.member(ev.node).operands[ev.operand].node for ev in ends}  # where its branch enters
    culprit = next(filter(None, (probe.zero_preserving(inside[u] | probe.path_nodes(u, adds), u) for u in uses)),
                   None)
    sums = [(probe.sums.member(ev.node), ev) for ev in ends]
    wanted = {s.operands[ev.operand].node for s, ev in sums}
    if any(probe.zero_preserving(inside[u], u) for u in uses):
        # The hook would zero the module's output after the activation fused into it (timm's
        # BatchNormAct2d), which may map zero elsewhere: zero γ and β themselves.
        module = None
    kept = _changed(probe, params, module, 0.0, arguments=wanted)[0]
    seen = [_operand_max(probe, kept, s, ev.operand, ev.reach[0]) for s, ev in sums]
    if any(math.isnan(x) for x in seen):
        return Check(e.param_name, e.role, "not_applicable", "the branch could not be observed in the train-mode pass")
    branch_max = max(seen)
    n = len({(s.node, ev.operand) for s, ev in sums})
    if branch_max == 0.0:
        return Check(e.param_name, e.role, "pass", f"zeroing γ and β zeroed its branch of {n} residual sum(s)")
    if culprit:
        return Check(e.param_name, e.role, "not_applicable", f"branch does not map zero to zero: {culprit}")
    return Check(e.param_name, e.role, "fail", f"its branch stayed non-zero (max |x| = {branch_max:.3g})")
