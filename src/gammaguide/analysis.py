"""``analyze``: one traced forward pass -> a role and a decision for every parameter."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import torch
from torch import nn
from torch.nn.parameter import UninitializedTensorMixin

from .errors import GammaGuideError
from .inputs import describe_inputs, eval_without_side_effects, prepare_inputs, unwrap
from .modtree import ModuleTree
from .norms import NormFinding, find_norms, op_label, training_candidate
from .ops import base_name
from .policy import Policy, resolve_policy
from .report import Entry, ParamInfo, Report
from .roles import PAPER_CATEGORY, Dataflow, strongest
from .sharding import whole_parameters
from .trace import Graph, gc_paused, trace


@dataclass
class Traced:
    """A traced model with its normalizations found; reusable across policies."""

    model: nn.Module  # as given (maybe wrapped)
    inner: nn.Module  # what was traced
    graph: Graph
    finding: NormFinding
    flow: Dataflow
    input_shapes: tuple[str, ...]
    # id -> whole shape, for parameters held as 1-D shards outside the trace (FSDP1).
    shapes: dict[int, tuple[int, ...]] = field(default_factory=dict)
    # ``inner``'s modules as walked for the analysis; None: walk them when needed.
    tree: ModuleTree | None = None
    traced_on: str = "real"  # "meta" when the forward pass ran on shapes alone (shapes.py)


def trace_model(model: nn.Module, example_inputs: Any = None, *, observe_adds=None,
                on_meta: bool | None = None) -> Traced:
    """``on_meta``: None runs the forward pass on shapes alone and, if it needs values, again
    for real; True or False runs it only that way. Observing adds needs values: real."""
    inner = unwrap(model)  # a clear error for anything that is not a module, before anything walks it
    if observe_adds is not None:
        on_meta = False
    # One walk for every stage. ``trace`` puts every module back exactly as it was (module_state.py),
    # modules or parameters the pass registered gone again, so the tree before it is the tree after it.
    tree = ModuleTree(inner)
    with whole_parameters(model, tree.modules if model is inner else None) as shapes:
        traced = _trace_whole(model, inner, tree, example_inputs, observe_adds=observe_adds, on_meta=on_meta)
    traced.shapes = {**traced.graph.lazy_shapes, **shapes}
    return traced


def _trace_whole(model: nn.Module, inner: nn.Module, tree: ModuleTree, example_inputs: Any = None, *,
                 observe_adds=None, on_meta: bool | None = None) -> Traced:
    args, kwargs = prepare_inputs(inner, example_inputs, tree)
    with eval_without_side_effects(inner, tree), _TrainingProbe(tree) as probe:
        try:
            graph, traced_on = _one_pass(inner, args, kwargs, tree, observe_adds, on_meta)
        except GammaGuideError:
            raise
        except Exception as exc:  # the user's forward pass: say what we ran it with
            raise GammaGuideError(
                f"the forward pass of {type(inner).__name__} failed with example inputs "
                f"({', '.join(describe_inputs(args, kwargs)) or 'no inputs'}): {type(exc).__name__}: {exc}. "
                f"Pass example_inputs with the shape, dtype and keywords the model's forward expects."
            ) from exc
    if not graph.outputs:
        raise GammaGuideError(
            f"the forward pass of {type(inner).__name__} returned no tensor (got nothing gammaguide can follow), so "
            f"the dataflow to the output cannot be traced; analyze a module whose forward returns its outputs "
            f"(for example wrap it: lambda-free nn.Module returning the logits)."
        )
    finding = find_norms(graph, inner, tree, probe)
    flow = Dataflow(graph, finding)
    return Traced(model, inner, graph, finding, flow, tuple(describe_inputs(args, kwargs)), tree=tree,
                  traced_on=traced_on)


class _TrainingProbe:
    """A hand-written normalization may use batch statistics only in training mode, and its
    running statistics (constants, to the trace) in the eval-mode pass. For the few modules that
    might be one (``norms.training_candidate``), the inputs of their first call are kept, and
    ``probe(module)`` traces the module alone in training mode on meta twins of them (shapes
    only; the module is left as it was, like any traced model)."""

    def __init__(self, tree: ModuleTree):
        self.candidates = [m for m in tree.modules if training_candidate(m)]
        self.inputs: dict[int, tuple[tuple, dict]] = {}
        self.handles: list = []

    def __enter__(self) -> "_TrainingProbe":
        for m in self.candidates:
            self.handles.append(m.register_forward_pre_hook(self._keep, with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()

    def _keep(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.inputs.setdefault(id(module), (args, kwargs))

    def __call__(self, module: nn.Module) -> Graph | None:
        if id(module) not in self.inputs:
            return None
        args, kwargs = self.inputs[id(module)]
        training = module.training
        try:
            module.train()
            with torch.no_grad():
                return trace(module, args, kwargs, on_meta=True)
        except Exception:  # it needs values, or fails in training mode: no evidence either way
            return None
        finally:
            module.train(training)


def _one_pass(inner: nn.Module, args: tuple, kwargs: dict, tree: ModuleTree, observe_adds,
              on_meta: bool | None) -> tuple[Graph, str]:
    """The traced graph, and whether it came from the meta pass or the real one."""
    if on_meta is not False:
        try:
            return trace(inner, args, kwargs, modules=tree.every, on_meta=True), "meta"
        except Exception:
            _refuse_quantized(inner, tree)
            if on_meta:
                raise
            # The forward pass needs values (see shapes.py): run it for real.
    else:
        _refuse_quantized(inner, tree)
    return trace(inner, args, kwargs, observe_adds=observe_adds, modules=tree.every), "real"


# Where the modules of an int8 model live (eager-mode static quantization; dynamic quantization keeps
# the float normalizations, and its analysis needs nothing special).
_QUANTIZED = ("torch.ao.nn.quantized.modules", "torch.ao.nn.intrinsic.quantized.modules", "torch.nn.quantized.modules",
              "torch.nn.intrinsic.quantized.modules")


def _refuse_quantized(inner: nn.Module, tree: ModuleTree) -> None:
    """An int8 model (its convolutions' weights packed integers, on which no meta pass runs) has no
    γ an optimizer trains: say what to analyze instead. Checked only when the meta pass failed."""
    # (A dynamically quantized Linear holds its packed weights in a LinearPackedParams of that namespace too.)
    found = next(((name, m) for name, m in tree.named_modules if type(m).__module__.startswith(_QUANTIZED)
                  and not type(m).__name__.endswith("PackedParams") and type(m).__name__ != "DeQuantize"), None)
    if found is not None:
        name, m = found
        raise GammaGuideError(
            f"{type(inner).__name__} is a quantized model ('{name}' is a {m._get_name()}): its weights are packed "
            f"int8 values that no optimizer trains, so there is no weight decay to decide. Analyze the float model "
            f"before quantizing it (for quantization-aware training, the model torch.ao.quantization.prepare_qat "
            f"returns)."
        )


def check_skip_list(skip_list: Any) -> tuple[str, ...]:
    """``skip_list`` as a tuple of names; a bare string (which would be read letter by letter) or
    anything but names is an error."""
    names = None if isinstance(skip_list, str) or not isinstance(skip_list, Iterable) else tuple(skip_list)
    if names is None or not all(isinstance(n, str) for n in names):
        raise GammaGuideError(f"skip_list must be a list of parameter names, got "
                              f"{'the string ' if isinstance(skip_list, str) else ''}{skip_list!r}; pass e.g. "
                              f"skip_list=['fc.weight', 'bn1.weight']")
    return names


def skipped_ids(model: nn.Module, inner: nn.Module, skip_list: Iterable[str]) -> set[int]:
    """Parameters never decayed: ``skip_list`` entries and the model's ``no_weight_decay()``
    (timm's convention). An entry matches a name exactly or as its dotted suffix."""
    names = set(skip_list)
    for m in {id(model): model, id(inner): inner}.values():
        fn = getattr(m, "no_weight_decay", None)
        if callable(fn):
            try:
                names.update(fn())
            except Exception:  # a model's helper that needs arguments; not our business
                pass
    if not names:
        return set()
    ids = set()
    for mod in (model, inner):
        for name, p in mod.named_parameters(remove_duplicate=False):
            if name in names or any(name.endswith("." + s) for s in names):
                ids.add(id(p))
    return ids


def build_report(
    traced: Traced,
    policy: Policy,
    skip_list: Iterable[str] = (),
) -> Report:
    model, inner, flow, finding, graph = traced.model, traced.inner, traced.flow, traced.finding, traced.graph
    tree = traced.tree if traced.tree is not None and traced.tree.model is inner else ModuleTree(inner)
    outer = tree if model is inner else ModuleTree(model)
    inner_params = dict(tree.named_parameters_all)
    module_outer = {id(m): name for name, m in outer.named_modules}  # each module once, under its first name

    # A parameter registered under several names is traced under its first one.
    aliases: dict[int, list[str]] = {}
    for name, p in inner_params.items():
        aliases.setdefault(id(p), []).append(name)

    # γ and β, by id of the parameter; with their module and norm type.
    gamma_info: dict[int, tuple[str, str, str]] = {}  # id -> (traced γ name, module name, norm type)
    beta_ids: set[int] = set()
    norms_of: dict[int, int] = {}  # id -> how many normalizations own the γ (several: tied)
    for nm in finding.modules.values():
        for g in nm.gammas:
            pid = id(inner_params[g])
            gamma_info.setdefault(pid, (aliases[pid][0], module_outer[id(nm.module)], type(nm.module).__name__))
            norms_of[pid] = norms_of.get(pid, 0) + 1
        beta_ids.update(id(inner_params[b]) for b in nm.betas)
    for node, (g, b) in finding.functional.items():
        if g is not None and g in inner_params:
            owner = g.rpartition(".")[0]
            owner_mod = tree.module(owner)
            label = finding.labels.get(node) or f"functional {op_label(base_name(graph.ops[node]))}"
            gamma_info.setdefault(id(inner_params[g]), (g, module_outer.get(id(owner_mod), owner), label))
        if b is not None and b in inner_params:
            beta_ids.add(id(inner_params[b]))

    uses = flow.uses() if gamma_info else {}
    skip = skipped_ids(model, inner, skip_list)

    entries: list[Entry] = []
    params: list[ParamInfo] = []
    decided: dict[tuple[str, str | None], bool] = {}
    warns = list(finding.warnings)
    unreached: list[str] = []  # normalizations the forward pass never ran
    shapes = traced.shapes
    for name, p in outer.named_parameters:
        pid = id(p)
        shape = shapes.get(pid)
        if shape is None:  # an uninitialized lazy parameter the pass did not reach has none yet
            # (The mixin, not UninitializedParameter: Parameter's metaclass makes isinstance slow.)
            shape = () if isinstance(p, UninitializedTensorMixin) else tuple(p.shape)
        role = None
        if pid in gamma_info:
            inner_name, module_name, norm_type = gamma_info[pid]
            outcomes: dict[str, str] = {}
            by_norm: dict[str, dict[str, str]] = {}  # the outcomes of each normalization's calls
            by_use: dict[int, dict[str, str]] = {}  # the outcomes of each use
            for u in sorted(uses.get(inner_name, ())):
                for r, why in flow.walk(u).items():
                    outcomes.setdefault(r, why)
                    by_norm.setdefault(flow.name(u), {}).setdefault(r, why)
                    by_use.setdefault(u, {}).setdefault(r, why)
            if norms_of.get(pid, 0) > 1:
                warns.extend(_tied_warning(name, by_norm, strongest(outcomes)[0], policy))
            elif len(by_use) > 1:
                warns.extend(_reused_warning(name, module_name, flow, by_use, strongest(outcomes)[0], policy))
            if inner_name in uses:
                role, reason = strongest(outcomes)
            else:
                role, reason = "unused", "not reached by the traced forward pass"
                unreached.append(inner_name.rpartition(".")[0])
            kind = "gamma"
        elif pid in beta_ids:
            kind = "beta"
        elif name.endswith("bias"):
            kind = "bias"
        elif sum(d > 1 for d in shape) >= 2:
            kind = "weight"
        else:
            # 1-D, or a per-channel vector kept as C x 1 x 1 (torchvision's ConvNeXt layer scale,
            # a class token): a scale like timm's 1-D layer scale, not a weight matrix.
            kind = "other"
        decision = decided.get((kind, role))
        if decision is None:  # one call per kind and role, not per parameter
            decision = decided[(kind, role)] = policy.decides(kind, role)
        decay = decision and pid not in skip
        if kind in ("gamma", "beta") and len(aliases.get(pid, ())) > 1:  # only shared ones can warn
            warns.extend(_shared_warning(name, kind, role, decay, aliases[pid], tree, finding))
        if kind == "gamma":
            if pid in skip:
                reason += " (in skip_list / no_weight_decay)"
            entries.append(Entry(name, module_name, norm_type, role, PAPER_CATEGORY[role], decay, reason))
        params.append(ParamInfo(name, kind, role, decay, shape, p.requires_grad))

    if unreached:
        warns.append(_unreached_warning(unreached, graph, module_outer.get(id(inner), ""), policy))
    return Report(
        entries=tuple(entries),
        params=tuple(params),
        residual_adds=tuple(flow.residual_adds()),
        warnings=tuple(warns),
        policy=policy.name,
        input_shapes=traced.input_shapes,
        traced_on=traced.traced_on,
    )


def _tied_warning(name: str, by_norm: dict[str, dict[str, str]], role: str, policy: Policy) -> list[str]:
    """One γ for several normalizations gets one role, the strongest over all their outputs: say
    so when their outputs would have had different roles (when they agree, nothing is lost)."""
    roles = {norm: strongest(outcomes)[0] for norm, outcomes in by_norm.items()}
    if len(set(roles.values())) < 2:
        return []
    each = ", ".join(f"{norm}: {r}" for norm, r in roles.items())
    decided = "decayed" if policy.decides("gamma", role) else "not decayed"
    return [
        f"γ '{name}' is shared by {len(roles)} normalizations whose outputs have different roles ({each}): it "
        f"takes the strongest, {role}, for all of them ({decided} under policy {policy.name}). Give each "
        f"normalization its own γ if they should be treated differently."
    ]


def _reused_warning(name: str, module_name: str, flow: Dataflow, by_use: dict[int, dict[str, str]], role: str,
                    policy: Policy) -> list[str]:
    """One normalization called at several places gets one role, the strongest over all its
    outputs: say so when the places would have had different roles (a LayerNorm used inside the
    blocks and again before the head)."""
    roles = {u: strongest(outcomes)[0] for u, outcomes in by_use.items() if u in flow.flow.norm_name}
    if len(set(roles.values())) < 2:
        return []
    places: dict[str, list[str]] = {}  # role -> the calls with it
    calls = flow.graph.calls
    for k, (u, r) in enumerate(roles.items(), 1):
        call = flow.flow.norm_call.get(u)
        parent = calls[call].parent if call is not None else -1
        where = (calls[parent].name or "<model>") if parent >= 0 else flow.flow.context(u)
        places.setdefault(r, []).append(f"call {k} in {where}")
    each = "; ".join(f"{r}: {', '.join(p[:3])}{f' and {len(p) - 3} more' if len(p) > 3 else ''}"
                     for r, p in places.items())
    decided = "decayed" if policy.decides("gamma", role) else "not decayed"
    return [
        f"normalization '{module_name or '<model>'}' is called at {len(roles)} places whose outputs have different "
        f"roles ({each}): its γ '{name}' takes the strongest, {role}, for all of them ({decided} under policy "
        f"{policy.name}). Give each place its own normalization if they should be treated differently."
    ]


def _unreached_warning(norms: list[str], graph: Graph, prefix: str, policy: Policy) -> str:
    """Normalizations the forward pass never ran have their γ ``unused`` (not decayed by
    ``guidelines``). Which modules a forward pass reaches can depend on its input (experts chosen by
    a router, a branch taken by value, a head used only in training): name the outermost modules not
    reached (``norms``: the normalizations' names in the traced model; ``prefix``: a wrapper's, to
    name them as the caller does), and say that the decision holds for this example input."""
    reached = {""}
    for call in graph.calls:
        if call.name:
            parts = call.name.split(".")
            reached.update(".".join(parts[:k]) for k in range(1, len(parts) + 1))
    outermost: list[str] = []
    for name in norms:
        while name.rpartition(".")[0] not in reached:
            name = name.rpartition(".")[0]
        name = f"{prefix}.{name}" if prefix and name else (name or prefix)
        if name not in outermost:
            outermost.append(name)
    shown = ", ".join(outermost[:6]) + (f" and {len(outermost) - 6} more" if len(outermost) > 6 else "")
    decided = "decayed" if policy.decides("gamma", "unused") else "not decayed"
    n = len(norms)
    return (f"the traced forward pass did not reach {shown}: the γ of {n} normalization{'s' * (n != 1)} there "
            f"{'are' if n != 1 else 'is'} unused ({decided} under policy {policy.name}). Which modules a forward "
            f"pass reaches can depend on its input (experts chosen by a router, a branch taken by value, a head used "
            f"only in training), so this decision holds for this example input only; pass example_inputs that reach "
            f"them if they are used.")


def _shared_warning(name: str, kind: str, role: str | None, decay: bool, aliases, tree: ModuleTree,
                    finding: NormFinding) -> list[str]:
    """A γ or β that is also some other module's parameter gets one decision for all its uses:
    say so, since the other module's author may expect another. ``aliases``: its names, two or more."""
    owned = {a: id(tree.module(a.rpartition(".")[0])) in finding.modules for a in aliases}
    others = [a for a, by_norm in owned.items() if not by_norm]
    norms = [a for a, by_norm in owned.items() if by_norm]
    if not others or not norms:
        return []
    what = "γ" if kind == "gamma" else "β"
    as_role = f", role {role}" if kind == "gamma" else ""
    return [
        f"parameter '{name}' is both a normalization's {what} ({', '.join(norms)}{as_role}) and a parameter of "
        f"another module ({', '.join(others)}): it is counted once, as a {what}, "
        f"{'decayed' if decay else 'not decayed'} for all its uses. Give the other module its own parameter if it "
        f"should be treated differently."
    ]


def analyze(
    model: nn.Module,
    example_inputs: Any = None,
    policy: str | Mapping[str, bool] | Policy = "guidelines",
    *,
    decay_bias: bool | None = None,
    decay_beta: bool | None = None,
    skip_list: Iterable[str] = (),
    warn: bool = True,
) -> Report:
    """Trace one forward pass of ``model`` and give every normalization scale a role.

    ``example_inputs`` is a tensor, a tuple of positional inputs or a dict of keyword
    inputs; image models get a default (1x3x224x224, or timm's ``pretrained_cfg``).
    The model's train/eval flags and normalization buffers are left exactly as they were.
    """
    resolved = resolve_policy(policy, decay_bias=decay_bias, decay_beta=decay_beta)
    skip_list = check_skip_list(skip_list)
    with gc_paused():
        report = build_report(trace_model(model, example_inputs), resolved, skip_list)
    if warn:
        for w in report.warnings:
            warnings.warn(w, stacklevel=2)
    return report


@dataclass(frozen=True)
class ResidualVariance:
    """Analysis 1 of the paper on one batch: how much a residual branch adds to the stream."""

    module_name: str
    branch_var: float
    skip_var: float

    @property
    def ratio(self) -> float:
        return self.branch_var / self.skip_var if self.skip_var > 0 else float("nan")


def residual_variances(model: nn.Module, example_inputs: Any = None) -> list[ResidualVariance]:
    """Variance of the branch and skip inputs of every residual addition, in eval mode,
    measured during one traced forward pass (before an in-place add overwrites them). For a sum
    of several branches, the branch variance is the sum of theirs."""
    traced = trace_model(model, example_inputs, observe_adds=_variance)
    seen, names = traced.graph.add_observations, traced.graph.op_names()

    def variance(operand: tuple[int, int]) -> float | None:
        node, pos = operand
        if names[node] not in _PLAIN_SUM_OPS or pos >= len(seen.get(node, ())):
            return None  # a product (``addcmul``) or a stack: its operand itself is not observed
        return seen[node][pos]

    out = []
    for r in traced.flow.residual_adds():
        skip, branches = variance(r.skip_operand), [variance(b) for b in r.branch_operands]
        if skip is None or None in branches:
            continue
        out.append(ResidualVariance(r.module_name, sum(branches), skip))
    return out


_PLAIN_SUM_OPS = frozenset({"add", "add_", "sub", "sub_", "rsub", "stack"})


def _variance(t: Any) -> float:
    if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.device.type == "meta" or t.numel() < 2:
        return float("nan")
    return float(t.detach().float().var())
