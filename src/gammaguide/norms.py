"""Find the normalization layers of a traced model and their scale (γ) and shift (β) parameters.

A module is a normalization when
1. it is an instance of a PyTorch normalization class (``BatchNorm*``, ``SyncBatchNorm``,
   ``InstanceNorm*``, ``LayerNorm``, ``GroupNorm``, ``RMSNorm`` and their subclasses, such as
   timm's ``BatchNormAct2d`` or ``LayerNorm2d``); or
2. its class name is in ``KNOWN_NORM_CLASSES`` (hand-written norms of Hugging Face, timm,
   Apex, Megatron and others); or
3. it passes the behavioural rule, checked on every traced call of the module: the call
   runs no weighted op (conv/linear/matmul/embedding), it computes a scale statistic
   (variance, standard deviation, norm, rsqrt, sqrt, or a fused norm kernel) of its input,
   and one of the module's own parameters multiplies a tensor derived from that statistic
   (``w * (x * rsqrt(v))``, or ``x * (w / sqrt(v))``), or multiplies the input before the
   product is multiplied or divided by it (``w * x * rsqrt(v)``). That parameter is the
   module's γ; its own parameters that are added or subtracted afterwards (``y + b``, ``y - b``,
   ``b - m * scale``) are β. The trace runs in eval mode, where a hand-written BatchNorm divides by its
   running statistics, which look like constants; so a leaf module with parameters and
   floating-point buffers that fails the rule is traced once more, alone and in training
   mode, on meta twins of its inputs, and the rule is checked on that trace.

A normalization op called functionally inside a bigger module (``F.layer_norm(x, s, w, b)``
in a block's ``forward``) is a normalization too; its weight argument is a γ. So is one
written out there (``F.rms_norm`` reaches the trace decomposed: ``x * rsqrt(mean(x²)) * w``):
an activation multiplied or divided by a statistic of an activation, then multiplied by a
channel-vector parameter, its γ. And a channel vector that multiplies the output of a
normalization without a γ (``BatchNorm2d(c, affine=False)``, then a scale module), with only
views between, is that normalization's γ.

Anything that looks like a normalization but fits none of these rules is reported as one
warning naming it: a class whose name contains "Norm" and that owns parameters (or has no
children), unless it reduces nothing (an elementwise affine map such as MobileBERT's
``NoNorm``) or it computes a parameter (a weight-norm parametrization); a vector parameter
multiplying a tensor normalized by a statistic of an activation outside every recognised
normalization; a module that divides by statistics of its buffers in eval mode but cannot be
traced in training mode. A scale after a recognised normalization that has its own γ (a
layer scale, a ReZero or SkipInit gate) is no γ and no warning: it is listed with the other
1-D parameters.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn
from torch.jit import ScriptModule

from .ops import ADD_OPS, MATMUL_OPS, MUL_OPS, NORM_OPS, SCALE_OPS, SHAPE_ONLY_OPS, STAT_OPS, VIEW_OPS
from .modtree import ModuleTree
from .trace import BUFFER, CONST, INPUT, LEAF_KINDS, PARAM, Arg, Graph

_TORCH_NORM_TYPES: tuple[type, ...] = tuple(
    t for t in (
        nn.modules.batchnorm._NormBase,  # BatchNorm*, SyncBatchNorm, InstanceNorm*, lazy variants
        nn.LayerNorm,
        nn.GroupNorm,
        getattr(nn, "RMSNorm", None),
    ) if t is not None
)

# Hand-written normalizations whose statistics are computed in Python; the registry spares
# them the behavioural check (some, like Gemma's ``(1 + weight)``, would still pass it).
KNOWN_NORM_CLASSES = frozenset({
    # Hugging Face transformers
    "LlamaRMSNorm", "MistralRMSNorm", "MixtralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "Qwen2MoeRMSNorm",
    "Qwen3MoeRMSNorm", "GemmaRMSNorm", "Gemma2RMSNorm", "Gemma3RMSNorm", "Phi3RMSNorm", "OlmoLayerNorm",
    "Olmo2RMSNorm", "CohereLayerNorm", "DeepseekV2RMSNorm", "DeepseekV3RMSNorm", "GraniteRMSNorm",
    "StableLmLayerNorm", "T5LayerNorm", "MT5LayerNorm", "UMT5LayerNorm", "LongT5LayerNorm",
    "Pix2StructLayerNorm", "ConvNextLayerNorm", "ConvNextV2LayerNorm", "MambaRMSNorm", "Mamba2RMSNorm",
    "FalconMambaRMSNorm", "IdeficsRMSNorm", "InternLM2RMSNorm", "BaichuanRMSNorm",
    # timm (most subclass torch norms and are caught by type; these do not)
    "RmsNorm", "RmsNorm2d", "SimpleNorm", "SimpleNorm2d", "LayerNormFp32", "LayerNorm2dFp32",
    "RmsNormFp32", "FastLayerNorm",
    # Apex / Megatron / xformers / others
    "FusedLayerNorm", "FusedRMSNorm", "MixedFusedLayerNorm", "MixedFusedRMSNorm", "RMSNorm",
    "LPLayerNorm", "LPRMSNorm", "FP32LayerNorm", "Fp32LayerNorm", "LayerNormChannelsFirst",
    "ChannelsFirstLayerNorm", "ScaleNorm",
})

# Norm-named modules that do not normalize by their input's statistics; never warned about.
NOT_NORM_CLASSES = frozenset({"FrozenBatchNorm2d", "LocalResponseNorm", "CrossMapLRN2d", "PreNorm", "PostNorm"})

GAMMA_NAMES = ("weight", "scale", "gamma", "g")
BETA_NAMES = ("bias", "beta", "shift", "b")

_DIV_OPS = frozenset({"div", "div_"})
_SUB_OPS = frozenset({"sub", "sub_"})


@dataclass
class NormModule:
    """A module recognised as a normalization."""

    module: nn.Module
    gammas: list[str] = field(default_factory=list)  # parameter names (as traced)
    betas: list[str] = field(default_factory=list)


@dataclass
class NormFinding:
    modules: dict[int, NormModule]  # id(module) -> NormModule
    norm_calls: list[int]  # outermost calls of normalization modules
    functional: dict[int, tuple[str | None, str | None]]  # native norm node -> (γ name, β name)
    warnings: list[str]
    # Functional nodes that are not a norm op but the γ product of a norm written out inline or
    # of a γ-less norm followed by a scale -> the norm type to report.
    labels: dict[int, str] = field(default_factory=dict)


def _direct_params(module: nn.Module, prefix: str) -> dict[str, str]:
    """attribute name -> qualified name, for parameters owned by the module itself."""
    dot = f"{prefix}." if prefix else ""
    # ``_parameters`` directly: named_parameters() walks the module tree even with recurse=False,
    # and this runs for every module call of every analysis.
    return {attr: dot + attr for attr, p in module._parameters.items() if p is not None}


def root_params(graph: Graph) -> list[str | None]:
    """For each node, the parameter it is a view, cast or copy of (None if it is not one)."""
    return graph.derived(_root_params)


def _root_params(graph: Graph) -> list[str | None]:
    root: list[str | None] = [None] * len(graph)
    for i, name in enumerate(graph.op_names()):
        if name == PARAM:
            root[i] = graph.leaf_names.get(i)
        elif name in VIEW_OPS and graph.ins[i]:
            root[i] = root[graph.ins[i][0]]
    return root


# Where a native norm op takes its γ and β (None: it has no β).
_AFFINE_AT = {"layer_norm": (2, 3), "native_layer_norm": (2, 3), "group_norm": (2, 3), "rms_norm": (2, None),
              "_fused_rms_norm": (2, None)}  # every other norm op: (input, weight, bias, ...)


def _affine_params(graph: Graph, root: list, i: int, name: str) -> tuple[str | None, str | None]:
    """The γ and β of the native norm op at node ``i``, by argument position: ``F.layer_norm(x, s,
    None, b)`` has a β and no γ."""
    record = graph.args.get(i)
    ins = graph.ins[i]
    tensors = [p for p, a in enumerate(record[0]) if isinstance(a, Arg)] if record is not None else []
    if len(tensors) != len(ins):  # a tensor passed by keyword: positions unknown, parameters in order
        found = [root[k] for k in ins if root[k] is not None] + [None, None]
        return found[0], found[1]
    at = {p: root[k] for p, k in zip(tensors, ins, strict=True)}
    gamma, beta = _AFFINE_AT.get(name, (1, 2))
    return at.get(gamma), at.get(beta) if beta is not None else None


def activations(graph: Graph) -> list[bool]:
    """Nodes computed by value from a model input (not from parameters, buffers or constants only)."""
    return graph.derived(_activations)


NO_DATAFLOW = frozenset(LEAF_KINDS) | SHAPE_ONLY_OPS  # leaves, and ops that read only a shape


def _activations(graph: Graph) -> list[bool]:
    act = [False] * len(graph)
    ins = graph.ins
    for i, name in enumerate(graph.op_names()):
        if name == INPUT:
            act[i] = True
        elif name not in NO_DATAFLOW:
            for k in ins[i]:  # a loop, not any() over a generator: a fifth of the time, on every analysis
                if act[k]:
                    act[i] = True
                    break
    return act


def _behaves_like_norm(graph: Graph, start: int, end: int, own: dict[str, str], root: list[str | None]):
    """Check the behavioural rule on the ops ``start <= i < end`` of one module call.

    Returns (γ names, β names), or None when the rule does not hold.
    """
    names, ins = graph.op_names(), graph.ins
    if STAT_OPS.isdisjoint(names[start:end]):  # it needs a statistic: most calls (a conv's) take none
        return None
    own_names = set(own.values())
    n = end - start
    from_input = [False] * n  # derived from an activation that entered the call
    from_stat = [False] * n  # derived from a scale statistic of such an activation
    # The own parameter a node was scaled by before the statistic was applied, as in
    # ``weight * x * rsqrt(var)`` (the γ multiplies the input, then the product is normalized).
    scaled: list[str | None] = [None] * n
    gammas: list[str] = []
    betas: list[str] = []
    identity = False
    for i in range(start, end):
        name = names[i]
        if name in LEAF_KINDS:
            continue
        if name in MATMUL_OPS and any(root[k] is not None for k in ins[i]):
            return None
        inp = stat = raw = False  # raw: some argument is an activation that no statistic scaled
        carried = None
        for k in ins[i]:
            # A leaf node is made when a tensor is first read, so the model's input may be a leaf
            # inside this call (a norm applied to the input itself): it enters the call all the same.
            if k < start or names[k] in LEAF_KINDS:
                entered = names[k] not in (PARAM, BUFFER, CONST)
                inp, raw = inp or entered, raw or entered
            else:
                inp = inp or from_input[k - start]
                stat = stat or from_stat[k - start]
                raw = raw or (from_input[k - start] and not from_stat[k - start])
                carried = carried or scaled[k - start]
        if name in ADD_OPS and stat and raw:
            identity = True  # ``γ·(x·N(x)) + β + x`` (GRN): the input added back to the normalized tensor
        if name in STAT_OPS and inp:
            stat = True
        from_input[i - start] = inp
        from_stat[i - start] = stat
        scaled[i - start] = carried
        params = [root[k] for k in ins[i] if root[k] in own_names]
        inner = [k - start for k in ins[i] if k >= start]  # (a leaf's flags are never set: False)
        if name in SCALE_OPS and carried and any(from_stat[j] and scaled[j] != carried for j in inner):
            # γ·x, then normalized by a statistic of x: the γ is the parameter carried along.
            gammas.extend(p for p in (carried,) if p not in gammas)
        if not params:
            continue
        # γ times a tensor derived from a statistic (never a parameter); or γ first in a division,
        # ``w / sqrt(v)``.
        by_stat = any(from_stat[j] for j in inner)
        if by_stat and (name in MUL_OPS or (name in _DIV_OPS and root[ins[i][0]] in own_names)):
            gammas.extend(p for p in params if p not in gammas)
        elif name in MUL_OPS and inp:
            scaled[i - start] = params[0]
        elif name in NORM_OPS and inp:
            # A fused kernel given the module's own weight (and bias) arguments.
            gammas.extend(p for p in params[:1] if p not in gammas)
            betas.extend(p for p in params[1:2] if p not in betas)
        elif (name in ADD_OPS or name in _SUB_OPS) and gammas:
            # A shift added or subtracted: ``y + b``, ``y - b``, ``x * scale + (b - m * scale)``.
            betas.extend(p for p in params if p not in betas and p not in gammas)
    # (Every γ above needed a statistic of the input: a product with one, or a fused kernel.)
    if not gammas:
        return None
    if identity:
        return KEEPS_IDENTITY
    return gammas, betas


# What ``_behaves_like_norm`` says of a call that scales by a statistic but adds its input back
# (ConvNeXt-V2's GRN): it does not divide out its input's scale, so it is no normalization, and
# its parameters are no γ (not warned about either: it is what it was written to be).
KEEPS_IDENTITY = "keeps identity"


# Reductions: a normalization divides by a statistic, which takes one. A module named like a norm
# whose calls reduce nothing (MobileBERT's ``NoNorm``: ``x * w + b``) is an affine map, not a norm.
_REDUCTIONS = STAT_OPS | frozenset({
    "mean", "sum", "amax", "amin", "max", "min", "aminmax", "logsumexp", "prod", "nansum", "nanmean", "median",
})


def _stat_derived(graph: Graph, act: list[bool], norm_nodes: set[int]) -> list[bool]:
    """Nodes that carry a tensor scaled by a statistic of an activation computed outside every
    recognised normalization, not yet through a weighted op or a recognised normalization. A
    statistic of a parameter (weight standardization, weight norm) is none: it normalizes no
    activation."""
    out = [False] * len(graph)
    ins = graph.ins
    for i, name in enumerate(graph.op_names()):
        if name in NO_DATAFLOW or name in MATMUL_OPS or i in norm_nodes:
            continue
        if name in STAT_OPS:
            out[i] = any(act[k] for k in ins[i])
        else:
            out[i] = any(out[k] for k in ins[i])
    return out


def op_label(name: str) -> str:
    """``native_layer_norm`` -> ``layer_norm``: a norm op as users write it."""
    return name.lstrip("_").removeprefix("native_")


def _through_views(graph: Graph, names: list[str], k: int) -> int:
    """The node a chain of views, reshapes and casts ending at ``k`` starts from."""
    while names[k] in VIEW_OPS and graph.ins[k]:
        k = graph.ins[k][0]
    return k


def _vector_params(tree: ModuleTree) -> dict[str, int]:
    """Parameters that can scale channels, by name, with their sizes: at most one dimension larger
    than 1 (1-D, a C x 1 x 1 vector or a scalar), i.e. no weight matrix or kernel."""
    return {n: p.numel() for n, p in tree.named_parameters_all if sum(d > 1 for d in p.shape) < 2}


def _factors(graph: Graph, names: list[str], node: int) -> tuple[list[int], int | None]:
    """The factors of product ``node`` and what it adds to them: ``addcmul(b, x, g)`` is ``b + x * g``."""
    ins = graph.ins[node]
    if names[node] in ("addcmul", "addcmul_") and len(ins) == 3:
        return list(ins[1:]), ins[0]
    return list(ins), None


def _one_vector(root: list[str | None], factors: list[int], vectors: dict[str, int]) -> str | None:
    """The one channel-vector parameter among ``factors``, if there is exactly one."""
    found = [root[k] for k in factors if root[k] in vectors]
    return found[0] if len(found) == 1 else None


def _scale_product(graph: Graph, names: list[str], root: list[str | None], node: int,
                   vectors: dict[str, int]) -> tuple[str, str | None] | None:
    """(γ, β) of a product by one channel vector, β when it adds a vector itself (``addcmul``)."""
    factors, added = _factors(graph, names, node)
    gamma = _one_vector(root, factors, vectors)
    if gamma is None:
        return None
    beta = root[added] if added is not None and root[added] in vectors and root[added] != gamma else None
    return gamma, beta


def _add_betas(graph: Graph, names: list[str], root: list[str | None], gammas: dict[int, tuple[str, str | None]],
               vectors: dict[str, int]) -> None:
    """β of the γ products in ``gammas`` (node -> (γ, None)): a vector parameter added to one."""
    if not gammas:
        return
    for i, name in enumerate(names):
        if name not in ADD_OPS or len(graph.ins[i]) != 2:
            continue
        a, b = graph.ins[i]
        for node, other in ((_through_views(graph, names, a), b), (_through_views(graph, names, b), a)):
            entry = gammas.get(node)
            if entry is not None and entry[1] is None and root[other] in vectors and root[other] != entry[0]:
                gammas[node] = (entry[0], root[other])


def _inline_norms(graph: Graph, root: list[str | None], act: list[bool], stat: list[bool],
                  vectors: dict[str, int], norm_nodes: set[int],
                  identity_params: set[str]) -> dict[int, tuple[str, str | None]]:
    """Normalizations written out in a bigger module's forward, as ``F.rms_norm`` is (it reaches
    the trace as ``x * rsqrt(mean(x²) + eps) * w``): an activation multiplied or divided by a
    statistic of an activation, then multiplied by a channel-vector parameter, its γ.
    A product whose result is added back to the x it normalized is none (``_adding_back``); its γ
    goes into ``identity_params``.
    Returns the γ product's node -> (γ, β)."""
    names, ins = graph.op_names(), graph.ins
    normalized: dict[int, int] = {}  # x * rsqrt(v) -> x
    raw: dict[int, int] = {}  # the γ product -> the x it normalized
    found: dict[int, tuple[str, str | None]] = {}
    for i, name in enumerate(names):
        if name not in SCALE_OPS or i in norm_nodes:
            continue
        acts = [k for k in ins[i] if act[k]]
        if len(acts) == 2 and stat[acts[0]] != stat[acts[1]]:
            # x * rsqrt(v), (x - m) / std
            normalized[i] = _through_views(graph, names, acts[0] if not stat[acts[0]] else acts[1])
        elif name in MUL_OPS and len(acts) == 1 and _through_views(graph, names, acts[0]) in normalized:
            pair = _scale_product(graph, names, root, i, vectors)
            if pair is not None:
                found[i] = pair
                raw[i] = normalized[_through_views(graph, names, acts[0])]
    for i in _adding_back(graph, names, raw):
        identity_params.add(found.pop(i)[0])
    _add_betas(graph, names, root, found, vectors)
    return found


def _adding_back(graph: Graph, names: list[str], raw: dict[int, int]) -> set[int]:
    """The γ products of ``raw`` (product -> the x it normalized) whose result, a β added or not, is
    added to that same x: ``γ·(x·N(x)) + β + x`` (ConvNeXt-V2's GRN written out) keeps the identity,
    so it does not divide out its input's scale and is no normalization."""
    if not raw:
        return set()
    origin = {i: i for i in raw}  # a node carrying a γ product (a β added to it or not) -> the product
    found: set[int] = set()
    for i, name in enumerate(names):
        if name not in ADD_OPS:
            continue
        ins = [_through_views(graph, names, k) for k in graph.ins[i]]
        hit = [origin[k] for k in ins if k in origin]
        if not hit:
            continue
        if any(raw[p] in ins for p in hit):
            found.update(hit)
        else:
            origin[i] = hit[0]
    return found


def _scales_after_affine_free(graph: Graph, root: list[str | None], outputs: dict[int, str],
                              vectors: dict[str, int], norm_nodes: set[int]) -> dict[int, tuple[str, str | None, str]]:
    """A channel vector that multiplies the output of a normalization without a γ of its own
    (``BatchNorm2d(c, affine=False)``, then a ``Scale`` module), with nothing but views between,
    is that normalization's γ. A scalar is not (SkipInit, ReZero: a gate of the whole branch).
    ``outputs``: the output node of each γ-less normalization -> its type.
    Returns the γ product's node -> (γ, β, the normalization's type)."""
    names = graph.op_names()
    found: dict[int, tuple[str, str | None]] = {}
    source: dict[int, str] = {}
    for i, name in enumerate(names):
        if name not in MUL_OPS or i in norm_nodes:
            continue
        norms = [outputs[n] for n in (_through_views(graph, names, k) for k in _factors(graph, names, i)[0])
                 if n in outputs]
        pair = _scale_product(graph, names, root, i, vectors) if norms else None
        if pair is not None and vectors[pair[0]] > 1:
            found[i] = pair
            source[i] = norms[0]
    _add_betas(graph, names, root, found, vectors)
    return {i: (g, b, source[i]) for i, (g, b) in found.items()}


def _is_known_norm(m: nn.Module) -> bool:
    return isinstance(m, _TORCH_NORM_TYPES) or type(m).__name__ in KNOWN_NORM_CLASSES


def _known_norm(m: nn.Module, name: str) -> NormModule:
    own = _direct_params(m, name)
    return NormModule(m, [own[a] for a in GAMMA_NAMES if a in own], [own[a] for a in BETA_NAMES if a in own])


def training_candidate(m: nn.Module) -> bool:
    """Might ``m`` be a hand-written normalization that uses batch statistics only in training
    mode (and its running statistics, which look like constants, in the eval-mode trace)? A leaf
    module with parameters and floating-point buffers that no other rule covers."""
    return (
        bool(m._parameters) and bool(m._buffers) and not m._modules
        and any(b is not None and b.is_floating_point() for b in m._buffers.values())
        and not _is_known_norm(m) and type(m).__name__ not in NOT_NORM_CLASSES
        and not isinstance(m, ScriptModule)  # compiled: no Python forward, and no hooks to see it by
    )


_UNTRACEABLE = "untraceable"


def _behaves_like_norm_in_training(m: nn.Module, name: str, train_probe):
    """The behavioural rule on a trace of the module alone in training mode (``train_probe``):
    (γ names, β names), None, or ``_UNTRACEABLE`` when that trace failed (it needs values)."""
    sub = train_probe(m)
    if sub is None:
        return _UNTRACEABLE
    own = _direct_params(m, "")
    found = _behaves_like_norm(sub, 0, len(sub), own, root_params(sub))
    if found is None or found is KEEPS_IDENTITY:
        return None
    dot = f"{name}." if name else ""
    return [dot + g for g in found[0]], [dot + b for b in found[1]]


def _parametrizations(tree: ModuleTree) -> set[int]:
    """Modules that compute a parameter (``torch.nn.utils.parametrizations.weight_norm``): they
    normalize a weight, never an activation."""
    from torch.nn.utils.parametrize import ParametrizationList

    return {id(c) for _, m in tree.named_modules if isinstance(m, ParametrizationList) for c in m.modules()}


def _affine_only(graph: Graph, calls, act: list[bool]) -> bool:
    """Every call reads an activation through ops the trace sees and reduces nothing: an
    elementwise map of its input (MobileBERT's ``NoNorm``), not a normalization."""
    names, ins = graph.op_names(), graph.ins
    for call in calls:
        ops = [i for i in range(call.start, call.end) if names[i] not in LEAF_KINDS]
        if any(names[i] in _REDUCTIONS for i in ops) or not any(act[k] for i in ops for k in ins[i]):
            return False
    return True


def find_norms(graph: Graph, model: nn.Module, tree: ModuleTree | None = None, train_probe=None) -> NormFinding:
    """``tree``: the model's walked modules (after the forward pass), when the caller has them.
    ``train_probe(module)``: a graph of the module alone traced in training mode, or None (see
    ``training_candidate``)."""
    tree = tree if tree is not None else ModuleTree(model)
    root = root_params(graph)
    warnings: list[str] = []
    identity: set[int] = set()  # modules that add their input back (KEEPS_IDENTITY)
    # Known normalizations, run or not (one the forward pass never ran owns a γ whose role is
    # "unused"); every other module that ran is looked at by the behavioural rule.
    modules: dict[int, NormModule] = {id(m): _known_norm(m, name) for name, m in tree.named_modules
                                      if _is_known_norm(m)}
    undecided: dict[int, tuple[nn.Module, str]] = {
        id(call.module): (call.module, call.name) for call in graph.calls
        if call.name is not None and id(call.module) not in modules
        and type(call.module).__name__ not in NOT_NORM_CLASSES}

    # Behavioural rule, on each call of each remaining module that owns parameters; then, for a
    # module that may use batch statistics only in training mode, on a training-mode trace.
    names = graph.op_names()
    for call in graph.calls:
        key = id(call.module)
        if key not in undecided or key in modules or STAT_OPS.isdisjoint(names[call.start:call.end]):
            continue  # the rule needs a statistic: most calls (a conv's) take none
        m, name = undecided[key]
        own = _direct_params(m, name)
        if not own:
            continue
        found = _behaves_like_norm(graph, call.start, call.end, own, root)
        if found is KEEPS_IDENTITY:
            identity.add(key)
        elif found is not None:
            modules[key] = NormModule(m, found[0], found[1])
    untraceable: list[tuple[int, nn.Module, str]] = []
    # (Without a probe, as verify's training-mode trace needs none, the rule above has seen it all.)
    for key, (m, name) in undecided.items() if train_probe is not None else ():
        if key not in modules and key not in identity and training_candidate(m):
            found = _behaves_like_norm_in_training(m, name, train_probe)
            if found is _UNTRACEABLE:
                untraceable.append((key, m, name))
            elif found is not None:
                modules[key] = NormModule(m, found[0], found[1])

    # Outermost calls of normalization modules: each becomes one node of the dataflow.
    norm_calls: list[int] = []
    within: list[bool] = []  # per call: whether it is a normalization's call or lies inside one
    for c, call in enumerate(graph.calls):
        nested = call.parent >= 0 and within[call.parent]
        if not nested and id(call.module) in modules:
            norm_calls.append(c)
        within.append(nested or id(call.module) in modules)

    # Native norm ops outside any normalization module: functional use inside a bigger module.
    in_norm_call = set()
    for c in norm_calls:
        in_norm_call.update(range(graph.calls[c].start, graph.calls[c].end))
    functional: dict[int, tuple[str | None, str | None]] = {}
    act = activations(graph)
    for i, op_name in enumerate(names):
        if op_name not in NORM_OPS or i in in_norm_call:
            continue
        if not graph.ins[i] or not act[graph.ins[i][0]]:
            continue  # normalizes a parameter (weight standardization), not an activation
        functional[i] = _affine_params(graph, root, i, op_name)

    # Normalizations whose γ lies outside them: a scale right after a γ-less norm, or written inline.
    labels: dict[int, str] = {}  # their γ product's node -> the norm type to report
    norm_nodes = in_norm_call | set(functional)
    gammaless: dict[int, str] = {}  # the output node of each normalization without a γ -> its type
    for c in norm_calls:
        call = graph.calls[c]
        ops = [i for i in range(call.start, call.end) if names[i] not in LEAF_KINDS]
        if ops and not modules[id(call.module)].gammas:
            gammaless[ops[-1]] = type(call.module).__name__
    gammaless.update((i, f"functional {op_label(names[i])}") for i, (g, _) in functional.items() if g is None)
    # A statistic of an activation outside every normalization: a norm written inline, or a warning.
    stats_outside = any(op in STAT_OPS and i not in norm_nodes and any(act[k] for k in graph.ins[i])
                        for i, op in enumerate(names))
    vectors = _vector_params(tree) if gammaless or stats_outside else {}
    if gammaless:
        # (Their products stay out of ``norm_nodes``: no statistic outside a norm reaches them.)
        for node, (gamma, beta, norm) in _scales_after_affine_free(graph, root, gammaless, vectors,
                                                                   norm_nodes).items():
            functional[node] = (gamma, beta)
            labels[node] = f"{norm} without affine, then a scale"
    stat: list[bool] | None = None
    # Parameters of a scale by a statistic that adds its input back (GRN): no γ, and no warning.
    identity_params = {q for key in identity for q in _direct_params(*undecided[key]).values()}
    if stats_outside:
        stat = _stat_derived(graph, act, norm_nodes)
        for node, pair in _inline_norms(graph, root, act, stat, vectors, norm_nodes, identity_params).items():
            functional[node] = pair
            norm_nodes.add(node)
            labels[node] = "inline normalization"
        stat = _stat_derived(graph, act, norm_nodes)

    # Warnings: norm-looking modules that were not recognised.
    recognised_params = {p for nm in modules.values() for p in nm.gammas + nm.betas}
    recognised_params.update(p for pair in functional.values() for p in pair if p)
    looked_at = [(key, m, name) for key, (m, name) in undecided.items() if key not in modules and key not in identity
                 and "Norm" in type(m).__name__
                 and (any(p is not None for p in m._parameters.values()) or not m._modules)]
    if looked_at or untraceable:
        skip = _parametrizations(tree)
        calls_of: dict[int, list] = {}
        for call in graph.calls:
            calls_of.setdefault(id(call.module), []).append(call)
        warned: set[int] = set()
        for key, m, name in untraceable:
            # Divides by a statistic (of its buffers) in eval mode; training mode would tell.
            if any(names[i] in STAT_OPS for c in calls_of[key] for i in range(c.start, c.end)):
                warned.add(key)
                cls = type(m).__name__
                warnings.append(
                    f"module '{name}' ({cls}) scales by a statistic of its buffers in eval mode, like a "
                    f"normalization with running statistics, but its training-mode forward pass needs values, so "
                    f"gammaguide could not check whether it normalizes by batch statistics: its parameters are "
                    f"treated as plain weights/biases. If it is a normalization, register the class with "
                    f"gammaguide.norms.register_norm_class('{cls}')."
                )
        for key, m, name in looked_at:
            if key in warned or key in skip or _affine_only(graph, calls_of[key], act):
                continue
            if any(q in recognised_params for q in _direct_params(m, name).values()):
                continue  # a block named like a norm, whose normalization was found inside it
            cls = type(m).__name__
            warnings.append(
                f"module '{name}' ({cls}) looks like a normalization but was not recognised: its parameters "
                f"are treated as plain weights/biases. If it normalizes its input, register the class with "
                f"gammaguide.norms.register_norm_class('{cls}')."
            )
    # A vector parameter scaling a tensor normalized outside any recognised normalization.
    if stat is not None:
        flagged: set[str] = set(identity_params)  # (flagged: warned about already, or never to be)
        for i, op_name in enumerate(names):
            if op_name not in MUL_OPS or i in norm_nodes:
                continue
            for k in graph.ins[i]:
                p = root[k]
                if p is None or p in recognised_params or p in flagged or p not in vectors:
                    continue
                if any(stat[j] and root[j] is None for j in graph.ins[i] if j != k):
                    flagged.add(p)
                    owner = p.rpartition(".")[0]
                    cls = type(tree.module(owner)).__name__
                    warnings.append(
                        f"parameter '{p}' (in {cls} '{owner}') multiplies a tensor normalized by a statistic of an "
                        f"activation, but not as a normalization's γ: it is not given a role. If it is a "
                        f"normalization scale, move the normalization into its own module or register the class "
                        f"with gammaguide.norms.register_norm_class('{cls}')."
                    )
    return NormFinding(modules, norm_calls, functional, warnings, labels)


def register_norm_class(class_name: str) -> None:
    """Treat every module of this class name as a normalization (γ: weight/scale/gamma/g;
    β: bias/beta/shift/b)."""
    global KNOWN_NORM_CLASSES
    if not isinstance(class_name, str) or not class_name:
        from .errors import GammaGuideError

        raise GammaGuideError(
            f"register_norm_class expects a class name as a non-empty string, got {class_name!r}; "
            f"pass type(module).__name__."
        )
    KNOWN_NORM_CLASSES = KNOWN_NORM_CLASSES | {class_name}
