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
   (``w * (x * rsqrt(v))``), or multiplies the input before the product is multiplied or
   divided by it (``w * x * rsqrt(v)``). That parameter is the module's γ; its own
   parameters that are added afterwards are β.

A normalization op called functionally inside a bigger module (``F.layer_norm(x, s, w, b)``
in a block's ``forward``) is a normalization too; its weight argument is a γ.

Anything that looks like a normalization but fits none of these rules is reported as a
warning naming the module: a class whose name contains "Norm" and that owns parameters
(or has no children), or a 1-D parameter multiplying a normalized tensor outside a
recognised normalization.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from .ops import ADD_OPS, MATMUL_OPS, MUL_OPS, NORM_OPS, SCALE_OPS, SHAPE_ONLY_OPS, STAT_OPS, VIEW_OPS
from .modtree import ModuleTree
from .trace import BUFFER, CONST, INPUT, LEAF_KINDS, PARAM, Graph

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


@dataclass
class NormModule:
    """A module recognised as a normalization, with how it was recognised."""

    module: nn.Module
    name: str
    how: str  # "type", "registry" or "behaviour"
    gammas: list[str] = field(default_factory=list)  # parameter names (as traced)
    betas: list[str] = field(default_factory=list)


@dataclass
class NormFinding:
    modules: dict[int, NormModule]  # id(module) -> NormModule
    norm_calls: list[int]  # outermost calls of normalization modules
    functional: dict[int, tuple[str | None, str | None]]  # native norm node -> (γ name, β name)
    warnings: list[str]


def _direct_params(module: nn.Module, prefix: str) -> dict[str, str]:
    """attribute name -> qualified name, for parameters owned by the module itself."""
    dot = f"{prefix}." if prefix else ""
    # ``_parameters`` directly: named_parameters() walks the module tree even with recurse=False,
    # and this runs for every module call of every analysis.
    return {attr: dot + attr for attr, p in module._parameters.items() if p is not None}


def root_params(graph: Graph) -> list[str | None]:
    """For each node, the parameter it is a view, cast or copy of (None if it is not one)."""
    return graph.derived("root_params", _root_params)


def _root_params(graph: Graph) -> list[str | None]:
    root: list[str | None] = [None] * len(graph)
    for i, name in enumerate(graph.op_names()):
        if name == PARAM:
            root[i] = graph.leaf_names.get(i)
        elif name in VIEW_OPS and graph.ins[i]:
            root[i] = root[graph.ins[i][0]]
    return root


def activations(graph: Graph) -> list[bool]:
    """Nodes computed by value from a model input (not from parameters, buffers or constants only)."""
    return graph.derived("activations", _activations)


def _activations(graph: Graph) -> list[bool]:
    act = [False] * len(graph)
    ins = graph.ins
    for i, name in enumerate(graph.op_names()):
        if name == INPUT:
            act[i] = True
        elif name not in LEAF_KINDS and name not in SHAPE_ONLY_OPS:
            act[i] = any(act[k] for k in ins[i])
    return act


def _behaves_like_norm(graph: Graph, start: int, end: int, own: dict[str, str], root: list[str | None]):
    """Check the behavioural rule on the ops ``start <= i < end`` of one module call.

    Returns (γ names, β names), or None when the rule does not hold.
    """
    own_names = set(own.values())
    n = end - start
    from_input = [False] * n  # derived from an activation that entered the call
    from_stat = [False] * n  # derived from a scale statistic of such an activation
    # The own parameter a node was scaled by before the statistic was applied, as in
    # ``weight * x * rsqrt(var)`` (the γ multiplies the input, then the product is normalized).
    scaled: list[str | None] = [None] * n
    gammas: list[str] = []
    betas: list[str] = []
    saw_stat = False
    names, ins = graph.op_names(), graph.ins
    for i in range(start, end):
        name = names[i]
        if name in LEAF_KINDS:
            continue
        if name in MATMUL_OPS and any(root[k] is not None for k in ins[i]):
            return None
        inp = stat = False
        carried = None
        for k in ins[i]:
            # A leaf node is made when a tensor is first read, so the model's input may be a leaf
            # inside this call (a norm applied to the input itself): it enters the call all the same.
            if k < start or names[k] in LEAF_KINDS:
                inp = inp or names[k] not in (PARAM, BUFFER, CONST)
            else:
                inp = inp or from_input[k - start]
                stat = stat or from_stat[k - start]
                carried = carried or scaled[k - start]
        if name in STAT_OPS and inp:
            stat = saw_stat = True
        from_input[i - start] = inp
        from_stat[i - start] = stat
        scaled[i - start] = carried
        params = [root[k] for k in ins[i] if root[k] in own_names]
        inner = [k - start for k in ins[i] if k >= start and names[k] not in LEAF_KINDS]
        if name in SCALE_OPS and carried and any(from_stat[j] and scaled[j] != carried for j in inner):
            # γ·x, then normalized by a statistic of x: the γ is the parameter carried along.
            gammas.extend(p for p in (carried,) if p not in gammas)
        if not params:
            continue
        others_stat = any(from_stat[j] and root[j + start] is None for j in inner)
        if name in MUL_OPS and others_stat:
            gammas.extend(p for p in params if p not in gammas)
        elif name in MUL_OPS and inp:
            scaled[i - start] = params[0]
        elif name in NORM_OPS:
            # A fused kernel given the module's own weight (and bias) arguments.
            gammas.extend(p for p in params[:1] if p not in gammas)
            betas.extend(p for p in params[1:2] if p not in betas)
        elif name in ADD_OPS and gammas:
            betas.extend(p for p in params if p not in betas and p not in gammas)
    if not saw_stat or not gammas:
        return None
    return gammas, betas


def _stat_derived(graph: Graph, root: list[str | None], norm_calls_nodes: set[int]) -> list[bool]:
    """Nodes that carry a normalized tensor: a statistic's result or a norm's output, not yet
    passed through a weighted op. Used only to warn about unrecognised γ-like parameters."""
    out = [False] * len(graph)
    for i, name in enumerate(graph.op_names()):
        if name in LEAF_KINDS:
            continue
        if name in STAT_OPS or i in norm_calls_nodes:
            out[i] = True
        elif name in MATMUL_OPS:
            out[i] = False
        else:
            out[i] = any(out[k] for k in graph.ins[i])
    return out


def _is_known_norm(m: nn.Module) -> bool:
    return isinstance(m, _TORCH_NORM_TYPES) or type(m).__name__ in KNOWN_NORM_CLASSES


def _known_norm(m: nn.Module, name: str) -> NormModule:
    own = _direct_params(m, name)
    nm = NormModule(m, name, "type" if isinstance(m, _TORCH_NORM_TYPES) else "registry")
    nm.gammas = [own[a] for a in GAMMA_NAMES if a in own]
    nm.betas = [own[a] for a in BETA_NAMES if a in own]
    return nm


def find_norms(graph: Graph, model: nn.Module, tree: ModuleTree | None = None) -> NormFinding:
    """``tree``: the model's walked modules (after the forward pass), when the caller has them."""
    tree = tree if tree is not None else ModuleTree(model)
    root = root_params(graph)
    modules: dict[int, NormModule] = {}
    warnings: list[str] = []
    undecided: dict[int, tuple[nn.Module, str]] = {}

    for call in graph.calls:
        m = call.module
        key = id(m)
        if key in modules or key in undecided or call.name is None:
            continue
        cls = type(m).__name__
        if _is_known_norm(m):
            modules[key] = _known_norm(m, call.name)
        elif cls not in NOT_NORM_CLASSES:
            undecided[key] = (m, call.name)
    # Normalizations the forward pass never ran still own a γ (its role is "unused").
    for name, m in tree.named_modules:
        if id(m) not in modules and _is_known_norm(m):
            modules[id(m)] = _known_norm(m, name)

    # Behavioural rule, on each call of each remaining module that owns parameters.
    for call in graph.calls:
        key = id(call.module)
        if key not in undecided or key in modules:
            continue
        m, name = undecided[key]
        own = _direct_params(m, name)
        if not own:
            continue
        found = _behaves_like_norm(graph, call.start, call.end, own, root)
        if found is not None:
            modules[key] = NormModule(m, name, "behaviour", found[0], found[1])

    # Outermost calls of normalization modules: each becomes one node of the dataflow.
    norm_calls: list[int] = []
    inside: list[int] = []  # per call: the outermost norm call it lies in, or -1
    for c, call in enumerate(graph.calls):
        parent_root = inside[call.parent] if call.parent >= 0 else -1
        if parent_root >= 0:
            inside.append(parent_root)
        elif id(call.module) in modules and call.end > call.start:
            inside.append(c)
            norm_calls.append(c)
        else:
            inside.append(-1)

    # Native norm ops outside any normalization module: functional use inside a bigger module.
    in_norm_call = set()
    for c in norm_calls:
        in_norm_call.update(range(graph.calls[c].start, graph.calls[c].end))
    functional: dict[int, tuple[str | None, str | None]] = {}
    act = activations(graph)
    names = graph.op_names()
    for i, op_name in enumerate(names):
        if op_name not in NORM_OPS or i in in_norm_call:
            continue
        if not graph.ins[i] or not act[graph.ins[i][0]]:
            continue  # normalizes a parameter (weight standardization), not an activation
        params = [root[k] for k in graph.ins[i] if root[k] is not None]
        functional[i] = (params[0] if params else None, params[1] if len(params) > 1 else None)

    # Warnings: norm-looking modules that were not recognised.
    recognised_params = {p for nm in modules.values() for p in nm.gammas + nm.betas}
    recognised_params.update(p for pair in functional.values() for p in pair if p)
    for key, (m, name) in undecided.items():
        if key in modules:
            continue
        cls = type(m).__name__
        has_own = any(p is not None for p in m._parameters.values())
        has_children = bool(m._modules)
        if "Norm" in cls and (has_own or not has_children):
            warnings.append(
                f"module '{name}' ({cls}) looks like a normalization but was not recognised: its parameters "
                f"are treated as plain weights/biases. If it normalizes its input, register the class with "
                f"gammaguide.norms.register_norm_class('{cls}')."
            )
    # Derived only when some multiplication involves an unrecognised parameter: most models have none.
    stat: list[bool] | None = None
    params_1d: set[str] = set()
    flagged: set[str] = set()
    for i, op_name in enumerate(names):
        if op_name not in MUL_OPS or i in in_norm_call:
            continue
        for k in graph.ins[i]:
            p = root[k]
            if p is None or p in recognised_params or p in flagged:
                continue
            if stat is None:
                stat = _stat_derived(graph, root, in_norm_call)
                params_1d = {n for n, q in tree.named_parameters if q.ndim <= 1}
            if p not in params_1d:
                continue
            if any(stat[j] and root[j] is None for j in graph.ins[i] if j != k):
                flagged.add(p)
                owner = p.rsplit(".", 1)[0] if "." in p else ""
                cls = type(model.get_submodule(owner)).__name__ if owner else type(model).__name__
                warnings.append(
                    f"parameter '{p}' (in {cls} '{owner}') multiplies a normalized tensor but its module was not "
                    f"recognised as a normalization, so it is not given a role. If it is a normalization scale, "
                    f"move the normalization into its own module or register the class with "
                    f"gammaguide.norms.register_norm_class('{cls}')."
                )
    return NormFinding(modules, norm_calls, functional, warnings)


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
