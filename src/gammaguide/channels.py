"""Which elements of a tensor carry a normalization's output, through the ops that move channels.

A walk from a normalization (walks.py) follows the elements its γ scales: at first every element
of the norm's output. Concatenation, slicing, splitting, index selection and view/transpose
shuffles move those elements around; a convolution or a linear layer mixes them with the other
elements of its input; a sum adds other features to them. What a later normalization makes of the
γ depends on it: it cancels the γ's scale only when each of its groups (a channel for BatchNorm,
a row for LayerNorm) holds scaled elements only or unscaled elements only.

The sets of elements are masks and reaches (masks.py): which elements are the γ's output scaled
(a norm downstream may cancel the scale) and which were mixed with other features (no norm can).
``transfer`` gives the reach of an op's result from the reaches of its arguments. Ops it does not
know keep a whole-tensor reach whole and make a partial one whole (the node-level view: a coarser
answer, never a crash).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .masks import (
    ALL, NOTHING, START, Part, Reach, drop_reduced, inter, minus, mixed_wins, ones, part, permute, place, reach_union,
    reshape, spread, take, touches, union, unsqueeze,
)
from .ops import CONV_OPS, NORM_OPS, PIECE, SPLIT_OPS, VIEW_OPS
from .trace import BUFFER, PARAM, Arg

if TYPE_CHECKING:
    from .flow import Flow

__all__ = ["ALL", "NOTHING", "START", "Part", "Reach", "additive", "invariant_at", "reach_union", "reduced_dims",
           "SQUASHING", "transfer"]


# ----------------------------------------------------------------------------- ops

_ADDITIVE = frozenset({
    "add", "add_", "sub", "sub_", "rsub", "where", "maximum", "minimum", "fmax", "fmin", "lerp", "lerp_",
    "clamp", "clamp_", "hypot", "atan2", "logaddexp", "masked_fill", "masked_fill_", "addcdiv", "addcdiv_",
})
_MULTIPLICATIVE = frozenset({"mul", "mul_", "div", "div_", "true_divide"})
# Ops whose result is a bounded weight of their input (a gate): a scale of the input does not pass.
SQUASHING = frozenset({"sigmoid", "sigmoid_", "hardsigmoid", "hardsigmoid_", "_softmax", "softmax", "_safe_softmax"})
_GATING = frozenset({"mul", "mul_"})
# Ops that keep each element in place but lack PyTorch's pointwise tag.
_SAME_PLACE = frozenset({
    "_to_copy", "to", "detach", "alias", "lift_fresh", "lift_fresh_copy", "native_dropout", "dropout",
    "feature_dropout", "alpha_dropout", "hardswish", "hardswish_", "hardsigmoid", "hardsigmoid_", "silu", "silu_",
    "mish", "mish_", "gelu", "gelu_", "softplus", "elu", "elu_", "selu", "selu_", "celu", "celu_", "leaky_relu",
    "leaky_relu_", "relu6", "prelu", "_prelu_kernel", "contiguous", "type_as", "clone", "expand_as", "_conj",
    "_neg_view", "rrelu_with_noise", "threshold", "hardtanh", "hardtanh_", "glu",
})
# Ops on the trailing spatial dimensions only (pooling, resizing): how many.
_SPATIAL = {
    **{f"{p}{k}d": k for k in (1, 2, 3) for p in (
        "avg_pool", "max_pool", "adaptive_avg_pool", "_adaptive_avg_pool", "adaptive_max_pool", "lp_pool",
        "reflection_pad", "replication_pad", "fractional_max_pool")},
    **{f"max_pool{k}d_with_indices": k for k in (1, 2, 3)},
    **{f"upsample_{m}{k}d": k for k in (1, 2, 3) for m in ("nearest", "linear", "bilinear", "bicubic", "trilinear")},
    **{f"_upsample_{m}{k}d": k for k in (1, 2, 3) for m in ("nearest_exact", "bilinear", "bicubic")},
    **{f"_upsample_{m}{k}d_aa": k for k in (1, 2, 3) for m in ("bilinear", "bicubic")},
    "grid_sampler_2d": 2, "im2col": 2, "col2im": 2,
}
SDPA_PREFIXES = ("scaled_dot_product", "_scaled_dot_product")
_pointwise_cache: dict[int, bool] = {}


def _pointwise(op) -> bool:
    key = id(op)
    found = _pointwise_cache.get(key)
    if found is None:
        found = _pointwise_cache[key] = torch.Tag.pointwise in getattr(op, "tags", ())
    return found


def _arg(args: tuple, i: int, default=None):
    return args[i] if i < len(args) else default


def _coarse(arrivals: dict[int, Reach]) -> Reach:
    """What an op we cannot follow element by element gives: a whole tensor scaled when its input
    was (the node-level view), and mixed when only part of it was: whether a norm could still
    divide the γ out is not known, so it is not claimed."""
    reaches = arrivals.values()
    if any(r[1] is not None or isinstance(r[0], Part) for r in reaches):
        return None, ALL
    return (ALL, None) if any(r[0] is not None for r in reaches) else NOTHING


def _mixed(arrivals: dict[int, Reach]) -> Reach:
    """The op mixes the elements it reaches with others: every element of its result is mixed."""
    return NOTHING if all(r == NOTHING for r in arrivals.values()) else (None, ALL)


def _per_mask(reach: Reach, fn) -> Reach:
    return mixed_wins(fn(reach[0]), fn(reach[1]))


def transfer(flow: "Flow", n: int, arrivals: dict[int, Reach]) -> Reach:
    """The reach of node ``n``'s result, given the reaches that arrive at its tensor arguments
    (by position in ``graph.ins[n]``); arguments not in ``arrivals`` carry none of the γ."""
    name = flow.names[n]
    op = flow.graph.ops[n]
    record = flow.graph.args.get(n)
    if name == PIECE:
        return _piece(flow, n, arrivals)
    if name in SPLIT_OPS:
        return arrivals[0]  # the pieces take their share
    if record is not None:
        handler = _HANDLERS.get(name)
        if handler is not None:
            out = handler(flow, n, record[0], record[1], arrivals)  # (args, result shape)
            if out is not None:
                return out
            return _coarse(arrivals)
    if name in _SPATIAL:
        k = _SPATIAL[name]
        r = arrivals.get(0, NOTHING)
        if len(arrivals) > 1 or touches(r[0], set(range(-k, 0))) or touches(r[1], set(range(-k, 0))):
            return _mixed(arrivals)
        return r
    if name in ("mm", "bmm", "addmm", "baddbmm", "addbmm", "_addmm_activation"):
        return _matmul(flow, n, name, arrivals)
    if name.startswith(SDPA_PREFIXES):
        return _attention(flow, n, arrivals)
    if name in ("copy_", "copy"):
        return arrivals.get(1, NOTHING)  # the result holds the source's values
    if name in _SAME_PLACE or _pointwise(op):
        return _elementwise(flow, n, name, arrivals)
    return _coarse(arrivals)


def _foreign(flow: "Flow", n: int, pos: int, arrivals: dict[int, Reach]) -> bool:
    """Is argument ``pos`` of ``n`` an activation that carries none of the γ?"""
    return pos not in arrivals and flow.act[flow.rep[flow.graph.ins[n][pos]]]


def additive(terms: list) -> Reach:
    """A sum of terms (reaches; ``None`` for an activation that carries none of the γ)."""
    reached = [t for t in terms if t is not None]
    s_any = m_any = None
    for s, m in reached:
        s_any, m_any = union(s_any, s), union(m_any, m)
    if len(reached) < len(terms):  # scaled elements plus other features: mixed
        return None, union(m_any, s_any)
    s_every = reached[0][0]
    for s, _ in reached[1:]:
        s_every = inter(s_every, s)
    return mixed_wins(s_every, union(m_any, minus(s_any, s_every)))


def _multiplicative(reaches) -> Reach:
    s = m = None
    for r in reaches:
        s, m = union(s, r[0]), union(m, r[1])
    return mixed_wins(s, m)


def _gate(flow: "Flow", n: int, arrivals: dict[int, Reach]) -> bool:
    """Does the γ reach product ``n`` only as a gate: squashed by a sigmoid or softmax (seen through
    views), multiplying features that carry none of it (squeeze-excitation, split attention,
    attention weights applied to values)? The γ then sets how the gate saturates, not a scale: no
    norm downstream divides it out."""
    ins, names = flow.graph.ins[n], flow.names
    if not any(_foreign(flow, n, p, arrivals) for p in range(len(ins))):
        return False  # ``x * sigmoid(x)``: a nonlinearity of the γ's own features
    for p in arrivals:
        k = ins[p]
        while names[k] in VIEW_OPS and flow.graph.ins[k]:
            k = flow.graph.ins[k][0]
        if names[k] not in SQUASHING:
            return False
    return True


def _elementwise(flow: "Flow", n: int, name: str, arrivals: dict[int, Reach]) -> Reach:
    ins = flow.graph.ins[n]
    if name in _GATING and len(ins) > 1 and _gate(flow, n, arrivals):
        return _mixed(arrivals)
    if len(ins) <= 1 or name in _MULTIPLICATIVE:
        return _multiplicative(arrivals.values())
    if name in ("addcmul", "addcmul_"):
        product = [arrivals[p] for p in (1, 2) if p in arrivals]
        terms = []
        if 0 in arrivals or _foreign(flow, n, 0, arrivals):
            terms.append(arrivals.get(0))
        if product:
            terms.append(_multiplicative(product))
        elif any(_foreign(flow, n, p, arrivals) for p in (1, 2) if p < len(ins)):
            terms.append(None)
        return additive(terms)
    first = 0
    if name == "where":
        if 0 in arrivals:
            return _mixed(arrivals)  # the condition picks elements: nothing stays a plain scaling
        first = 1
    terms = [arrivals.get(p) for p in range(first, len(ins)) if p in arrivals or _foreign(flow, n, p, arrivals)]
    if len(terms) <= 1 and name not in _ADDITIVE:  # a function of one activation
        return _multiplicative(arrivals.values())
    return additive(terms)


def _piece(flow: "Flow", n: int, arrivals: dict[int, Reach]) -> Reach:
    r = arrivals[0]
    if r == NOTHING or (not isinstance(r[0], Part) and not isinstance(r[1], Part)):
        return r
    split = flow.graph.ins[n][0]
    index = flow.graph.args[n][0]
    record = flow.graph.args.get(split)
    if record is None:
        return _coarse(arrivals)
    args, shapes = record[0], record[1]
    shape = args[0].shape
    rank, name = len(shape), flow.names[split]
    if name == "unbind":
        dim = _arg(args, 1, 0)
        return _per_mask(r, lambda m: take(m, rank, dim, [index], drop=True))
    dim = _arg(args, 2, 0)
    d = dim % rank
    start = sum(s[d] for s in shapes[:index])
    stop = start + shapes[index][d]
    return _per_mask(r, lambda m: take(m, rank, dim, range(start, stop)))


# -- handlers for recorded ops: (flow, node, args, result shape, arrivals) -> reach, None = coarse
# (An op with one tensor argument gets its reach at position 0: ``arrivals[0]``.)


def _view(flow, n, args, shape, arrivals):
    return _per_mask(arrivals[0], lambda m: reshape(m, args[0].shape, shape))


def _transpose(flow, n, args, shape, arrivals):
    rank = len(args[0].shape)
    perm = list(range(rank))
    if len(args) < 3:  # ``t``: a matrix transposed, a vector left as it is
        if rank == 2:
            perm = [1, 0]
    else:
        a, b = args[1] % rank, args[2] % rank
        perm[a], perm[b] = perm[b], perm[a]
    return _per_mask(arrivals[0], lambda m: permute(m, args[0].shape, perm))


def _permute(flow, n, args, shape, arrivals):
    return _per_mask(arrivals[0], lambda m: permute(m, args[0].shape, list(args[1])))


def _slice(flow, n, args, shape, arrivals):
    src = args[0].shape
    rank = len(src)
    dim = _arg(args, 1, 0)
    size = src[dim % rank]
    start, stop, step = _arg(args, 2), _arg(args, 3), _arg(args, 4, 1)
    keep = range(size)[slice(start, stop, step)]
    return _per_mask(arrivals[0], lambda m: take(m, rank, dim, keep))


def _select(flow, n, args, shape, arrivals):
    rank = len(args[0].shape)
    index = args[2] % args[0].shape[args[1] % rank]
    return _per_mask(arrivals[0], lambda m: take(m, rank, args[1], [index], drop=True))


def _fixed_index(flow: "Flow", k: int, arg) -> bool:
    """Are the values of index tensor ``arg`` (node ``k``) known alike on the meta and the real pass?
    Those of a buffer or parameter (or a view of one) are; those the forward pass computes are not:
    on meta tensors they would be shapes alone."""
    if not isinstance(arg, Arg) or arg.values is None or len(arg.shape) != 1:
        return False
    names, ins = flow.names, flow.graph.ins
    while names[k] in VIEW_OPS and ins[k]:
        k = ins[k][0]
    return names[k] in (BUFFER, PARAM)


def _index_select(flow, n, args, shape, arrivals):
    r = arrivals.get(0, NOTHING)
    if set(arrivals) - {0}:
        return _mixed(arrivals)
    rank = len(args[0].shape)
    if not (isinstance(r[0], Part) or isinstance(r[1], Part)):
        return r
    if not _fixed_index(flow, flow.graph.ins[n][1], args[2]):
        return None
    return _per_mask(r, lambda m: take(m, rank, args[1], args[2].values))


def _index(flow, n, args, shape, arrivals):
    """``x[:, idx]``: one 1-D index tensor in one dimension, like ``index_select``."""
    r = arrivals.get(0, NOTHING)
    if set(arrivals) - {0}:
        return _mixed(arrivals)
    if not (isinstance(r[0], Part) or isinstance(r[1], Part)):
        return r
    indices = args[1]
    given = [(d, a) for d, a in enumerate(indices) if a is not None]
    if len(given) != 1 or len(flow.graph.ins[n]) != 2 or not _fixed_index(flow, flow.graph.ins[n][1], given[0][1]):
        return None
    dim, index = given[0]
    rank = len(args[0].shape)
    return _per_mask(r, lambda m: take(m, rank, dim, index.values))


def _cat(flow, n, args, shape, arrivals):
    rank = len(shape)
    dim = _arg(args, 1, 0)
    places = flow.memo.get(("cat", n))
    if places is None:  # where each input lands: (offset, size) along the dimension
        d, offset, places = dim % rank, 0, []
        for t in args[0]:
            size = t.shape[d] if len(t.shape) == rank else 0
            places.append((offset, size))
            offset += size
        flow.memo[("cat", n)] = places
    s = m = None
    for pos, (ps, pm) in arrivals.items():
        offset, size = places[pos]
        s = union(s, place(ps, shape, dim, offset, size))
        m = union(m, place(pm, shape, dim, offset, size))
    return mixed_wins(s, m)


def _stack(flow, n, args, shape, arrivals):
    rank = len(shape)
    dim = _arg(args, 1, 0) % rank
    s = m = None
    for pos, (ps, pm) in arrivals.items():  # a concatenation of the inputs, each unsqueezed at ``dim``
        s = union(s, place(unsqueeze(ps, rank, dim), shape, dim, pos, 1))
        m = union(m, place(unsqueeze(pm, rank, dim), shape, dim, pos, 1))
    return mixed_wins(s, m)


def _flip(flow, n, args, shape, arrivals):
    rank = len(args[0].shape)
    r = arrivals[0]
    for dim in args[1]:
        size = args[0].shape[dim % rank]
        r = _per_mask(r, lambda m, dim=dim, size=size: take(m, rank, dim, range(size - 1, -1, -1)))
    return r


def _roll(flow, n, args, shape, arrivals):
    rank = len(args[0].shape)
    shifts, dims = list(args[1]), list(_arg(args, 2, []))
    r = arrivals[0]
    if not dims:
        return None if isinstance(r[0], Part) or isinstance(r[1], Part) else r
    for shift, dim in zip(shifts, dims, strict=False):
        size = args[0].shape[dim % rank]
        keep = [(i - shift) % size for i in range(size)]
        r = _per_mask(r, lambda m, dim=dim, keep=keep: take(m, rank, dim, keep))
    return r


def _pad(flow, n, args, shape, arrivals):
    """``constant_pad_nd`` pads the last len(pad) / 2 dimensions: elements there keep their
    place, but a part along them gains unscaled neighbours."""
    r = arrivals[0]
    padded = set(range(-(len(args[1]) // 2), 0))
    if touches(r[0], padded) or touches(r[1], padded):
        return _mixed(arrivals)
    return r


def _expand(flow, n, args, shape, arrivals):
    return arrivals[0]  # expanded dimensions had size 1: never part of a mask


def _repeat(flow, n, args, shape, arrivals):
    r = arrivals[0]
    reps = list(args[1])
    varying = {d for mask in r if isinstance(mask, Part) for d in mask.dims}  # negative: from the end
    return r if all(reps[d] == 1 for d in varying) else None


def _channel_shuffle(flow, n, args, shape, arrivals):
    src = tuple(args[0].shape)
    groups = args[1]
    split = (src[0], groups, src[1] // groups) + src[2:]
    rank = len(split)
    perm = [0, 2, 1] + list(range(3, rank))

    def shuffle(m):
        return reshape(permute(reshape(m, src, split), split, perm), tuple(split[i] for i in perm), src)

    return _per_mask(arrivals[0], shuffle)


def reduced_dims(name: str, args: tuple, rank: int, kwargs: dict | None = None) -> tuple[set[int], bool, bool]:
    """(reduced dimensions, negative; keepdim; whether the op only mixes along them, as softmax)."""
    every = set(range(-rank, 0))
    if name in ("_softmax", "softmax", "_log_softmax", "log_softmax", "_safe_softmax", "cumsum"):
        return {_arg(args, 1, -1) % rank - rank}, True, True
    kwargs = kwargs or {}
    if name in ("norm", "linalg_vector_norm"):
        dims, keep = _arg(args, 2, kwargs.get("dim")), _arg(args, 3, kwargs.get("keepdim", False))
    elif name in ("var", "std", "var_mean", "std_mean"):  # (x, dim, *, correction, keepdim)
        dims, keep = _arg(args, 1, kwargs.get("dim")), kwargs.get("keepdim", False)
        if len(args) > 2 and isinstance(args[2], bool):  # the older (x, dim, unbiased, keepdim)
            keep = _arg(args, 3, keep)
    else:
        dims, keep = _arg(args, 1, kwargs.get("dim")), _arg(args, 2, kwargs.get("keepdim", False))
    if isinstance(dims, int) and not isinstance(dims, bool):
        dims = [dims]
    if not isinstance(dims, (list, tuple)) or len(dims) == 0:
        return every, bool(keep) if isinstance(keep, bool) else False, False
    return {d % rank - rank for d in dims}, bool(keep) if isinstance(keep, bool) else False, False


def _reduction(flow, n, args, shape, arrivals):
    if any(isinstance(a, Arg) for a in args[1:]):  # ``max(x, y)`` and the like: elementwise
        return _elementwise(flow, n, flow.names[n], arrivals)
    if set(arrivals) - {0}:
        return _mixed(arrivals)
    rank = len(args[0].shape)
    dims, keepdim, _ = reduced_dims(flow.names[n], args, rank, flow.graph.args[n][2])
    r = arrivals.get(0, NOTHING)
    if touches(r[0], dims) or touches(r[1], dims):
        return _mixed(arrivals)
    return _per_mask(r, lambda m: drop_reduced(m, rank, dims, keepdim))


def _conv(flow, n, args, shape, arrivals):
    """A convolution mixes the channels within each of its groups, and nearby positions."""
    if set(arrivals) - {0}:
        if set(arrivals) == {1} and arrivals[1] == START:
            return START  # a whole scaled weight scales the result
        return _mixed(arrivals)
    r = arrivals[0]
    src, weight = args[0].shape, args[1].shape
    if not (isinstance(r[0], Part) or isinstance(r[1], Part)):
        return r
    groups = args[8] if flow.names[n] in ("convolution", "_convolution") else args[-1]
    groups = groups if isinstance(groups, int) and not isinstance(groups, bool) else 1
    rank, spatial = len(src), len(weight) - 2
    channel = -(spatial + 1)
    masks = [m for m in r if isinstance(m, Part)]
    if any(m.dims != (channel,) for m in masks if touches(m, set(range(-spatial, 0)) | {channel})):
        return _mixed(arrivals)  # a part across positions: mixed by the kernel
    if not any(touches(m, {channel}) for m in masks):
        return r  # a part across samples: the convolution keeps it
    c_in, c_out = src[rank + channel], shape[len(shape) + channel]
    per_in, per_out = c_in // groups, c_out // groups
    if per_in == 1:  # depthwise: each channel on its own (``per_out`` times)
        return mixed_wins(*(None if m is None else m if m is ALL else
                        part((channel,), (c_out,), spread(m.bits, c_in, 1, per_out)) for m in r))
    s_bits = m_bits = 0
    seg_s, seg_m, full_in = _bits_of(r[0], c_in), _bits_of(r[1], c_in), ones(per_in)
    for g in range(groups):
        s_seg, m_seg = (seg_s >> (g * per_in)) & full_in, (seg_m >> (g * per_in)) & full_in
        run = ones(per_out) << (g * per_out)
        if m_seg or (s_seg and s_seg != full_in):
            m_bits |= run
        elif s_seg:
            s_bits |= run
    return mixed_wins(part((channel,), (c_out,), s_bits), part((channel,), (c_out,), m_bits))


def _bits_of(mask, n: int) -> int:
    if mask is None:
        return 0
    if mask is ALL:
        return ones(n)
    return mask.bits


_HANDLERS = {
    **{name: _view for name in ("view", "_unsafe_view", "reshape", "_reshape_alias", "squeeze", "unsqueeze",
                                "flatten", "unflatten")},
    "transpose": _transpose, "t": _transpose, "permute": _permute, "slice": _slice,
    "select": _select, "index_select": _index_select, "index": _index, "cat": _cat, "stack": _stack,
    "flip": _flip, "roll": _roll, "expand": _expand, "repeat": _repeat, "constant_pad_nd": _pad,
    "channel_shuffle": _channel_shuffle, "native_channel_shuffle": _channel_shuffle,
    **{name: _reduction for name in ("sum", "mean", "amax", "amin", "max", "min", "var", "std", "var_mean",
                                     "std_mean", "norm", "linalg_vector_norm", "logsumexp", "prod", "_softmax",
                                     "softmax", "_log_softmax", "log_softmax", "_safe_softmax", "cumsum",
                                     "nansum", "nanmean")},
    **{name: _conv for name in CONV_OPS},
}


def _matmul(flow, n, name, arrivals):
    """``a @ b`` mixes along ``a``'s last and ``b``'s second-to-last dimension; the bias of
    ``addmm`` is added."""
    first = 1 if name in ("addmm", "baddbmm", "addbmm", "_addmm_activation") else 0
    contracted = {first: {-1}, first + 1: {-2}}
    product = []
    for pos, r in arrivals.items():
        if pos < first:
            continue
        if touches(r[0], contracted.get(pos, set())) or touches(r[1], contracted.get(pos, set())):
            return _mixed(arrivals)
        if name == "addbmm" and (touches(r[0], {-3}) or touches(r[1], {-3})):
            return _mixed(arrivals)
        product.append(r)
    if not first and product and _gate(flow, n, arrivals):
        return _gated(_multiplicative(product))  # softmax(q @ k.T) @ v, the γ in q or k only
    terms = [_multiplicative(product)] if product else []
    if first and (0 in arrivals or _foreign(flow, n, 0, arrivals)):
        terms.append(arrivals.get(0))
    if product and not terms[1:] and first and not flow.act[flow.rep[flow.graph.ins[n][0]]]:
        return terms[0]
    if not product and first and 0 not in arrivals:
        return NOTHING
    if len(terms) == 1:
        return terms[0] if terms[0] is not None else NOTHING
    if not product:
        terms.append(None)  # the bias reached, the product is other features
    return additive(terms)


def _attention(flow: "Flow", n: int, arrivals: dict[int, Reach]) -> Reach:
    """Scaled dot-product attention: each query row gives one output row; keys and values are
    mixed across positions. A γ in the queries or keys alone, with values of other features, is
    a gate on them (as in ``_gate``): it sets the softmax's temperature, which no norm divides out."""
    kept = {0: {-1}, 1: {-1, -2}, 2: {-2}}
    for pos, r in arrivals.items():
        if pos not in kept or touches(r[0], kept[pos]) or touches(r[1], kept[pos]):
            return _mixed(arrivals)
    out = _multiplicative(arrivals.values())
    if 2 not in arrivals and _foreign(flow, n, 2, arrivals):
        return _gated(out)
    return out


def _gated(reach: Reach) -> Reach:
    """What a gate's product carries: every element the γ reaches is mixed with other features."""
    return None, union(reach[0], reach[1])


# ----------------------------------------------------------------------------- normalization groups


def norm_groups(flow: "Flow", node: int, source: int) -> tuple[list[int], set[int], int] | None:
    """``_norm_groups``, once per normalization and source."""
    key = ("groups", node, source)
    if key not in flow.memo:
        flow.memo[key] = _norm_groups(flow, node, source)
    return flow.memo[key]


def _norm_groups(flow: "Flow", node: int, source: int) -> tuple[list[int], set[int], int] | None:
    """How the normalization at ``node`` groups the elements it receives from ``source``: the ops
    from ``source`` to the op that computes its statistics, the dimensions (negative, relative to
    that op's input) each statistic is taken over (for a group norm: besides its channels), and a
    group norm's number of channel groups (else 0). None when it cannot be told."""
    graph, names = flow.graph, flow.names
    call = flow.norm_call.get(node)
    start, end = (graph.calls[call].start, graph.calls[call].end) if call is not None else (node, node + 1)
    for i in range(start, end):
        name = names[i]
        record = graph.args.get(i)
        if record is None or not graph.ins[i]:
            continue
        args = record[0]
        if name in NORM_OPS or name in ("mean", "var", "std", "var_mean", "std_mean", "norm", "linalg_vector_norm"):
            chain = _chain(flow, source, graph.ins[i][0], start)
            if chain is None:
                continue
            rank = len(args[0].shape)
            if name in NORM_OPS:
                if "layer_norm" in name or "rms_norm" in name:
                    return chain, set(range(-len(args[1]), 0)), 0
                if "group_norm" in name:
                    return chain, set(range(-rank, 0)) - {1 - rank}, args[6]
                return chain, set(range(-rank, 0)) - {1 - rank}, 0  # batch and instance norms: per channel
            dims, _, _ = reduced_dims(name, args, rank, graph.args[i][2])
            return chain, dims, 0
    return None


def _chain(flow: "Flow", source: int, target: int, start: int) -> list[int] | None:
    """The ops from ``source`` to ``target`` (a path through ops of one activation argument each,
    inside the normalization's call), in order; None when there is no such path."""
    chain = []
    while target != source:
        if target < start or target < source:
            return None
        acts = [k for k in flow.graph.ins[target] if flow.act[k]]
        if len(acts) != 1:
            return None
        chain.append(target)
        target = acts[0]
    chain.reverse()
    return chain


def invariant_at(flow: "Flow", node: int, source: int, scaled) -> bool:
    """Does the normalization at ``node`` cancel a scaling of the elements ``scaled`` of what it
    receives from ``source``? It does when each of its groups is all scaled or all unscaled."""
    if scaled is ALL or scaled is None:
        return True
    found = norm_groups(flow, node, source)
    if found is None:
        return False
    chain, dims, groups = found
    reach: Reach = (scaled, None)
    for op in chain:
        pos = flow.graph.ins[op].index(next(k for k in flow.graph.ins[op] if flow.act[k]))
        reach = transfer(flow, op, {pos: reach})
        if reach[1] is not None:
            return False
    mask = reach[0]
    if not isinstance(mask, Part):
        return True
    if not groups:
        return not touches(mask, dims)
    if len(mask.dims) != 1 or mask.dims[0] in dims:
        return False  # the channel dimension is the one a group norm's statistics are not taken over
    per = mask.sizes[0] // groups
    return all(((mask.bits >> (g * per)) & ones(per)) in (0, ones(per)) for g in range(groups))
