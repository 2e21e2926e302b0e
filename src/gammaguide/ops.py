"""What gammaguide needs to know about aten ops, by their base name."""

from __future__ import annotations

from functools import lru_cache

import torch

# Ops that normalize their input with its own statistics. A walk stops here.
NORM_OPS = frozenset({
    "native_batch_norm", "_native_batch_norm_legit", "_native_batch_norm_legit_no_training",
    "_native_batch_norm_legit_functional", "_batch_norm_with_update", "_batch_norm_with_update_functional",
    "_batch_norm_no_update", "batch_norm", "cudnn_batch_norm", "miopen_batch_norm",
    "native_layer_norm", "layer_norm", "native_group_norm", "group_norm",
    "rms_norm", "_fused_rms_norm", "instance_norm",
})

# Reductions that compute a scale statistic; the evidence of a hand-written normalization.
STAT_OPS = NORM_OPS | frozenset({
    "var", "var_mean", "std", "std_mean", "rsqrt", "sqrt", "norm", "linalg_vector_norm",
})

# Ops whose output is a weighted transform of an activation when one operand is a parameter.
MATMUL_OPS = frozenset({
    "convolution", "_convolution", "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d",
    "conv_transpose3d", "mkldnn_convolution", "cudnn_convolution", "cudnn_convolution_transpose",
    "addmm", "mm", "bmm", "baddbmm", "matmul", "linear", "_addmm_activation", "einsum",
    "embedding", "_embedding_bag", "embedding_bag", "_scaled_mm",
})

# Ops that pass a tensor through without changing what it is (shape, dtype, layout, copies).
# A parameter seen through them is still that parameter.
VIEW_OPS = frozenset({
    "view", "_unsafe_view", "reshape", "_reshape_alias", "t", "transpose", "permute", "expand",
    "unsqueeze", "squeeze", "flatten", "unflatten", "select", "slice", "alias", "detach", "as_strided",
    "contiguous", "clone", "_to_copy", "to", "_to_dtype", "lift_fresh", "lift_fresh_copy", "view_as",
    "expand_as", "split", "split_with_sizes", "chunk", "unbind", "movedim", "_conj", "_neg_view",
    "numpy_T", "mT", "type_as", "repeat", "getitem",
})

# Ops that scale a tensor elementwise by another.
MUL_OPS = frozenset({"mul", "mul_", "addcmul", "addcmul_"})
SCALE_OPS = MUL_OPS | {"div", "div_"}

# Residual additions are spelled with these (``+``, ``+=``, ``torch.add``, ``add_``).
ADD_OPS = frozenset({"add", "add_"})
# Every op that adds tensors, and may therefore be (part of) a sum: ``x - (-b)`` adds ``b``,
# ``x.addcmul(b, t)`` adds ``b * t`` (see sums.py).
SUM_OPS = ADD_OPS | frozenset({"sub", "sub_", "rsub", "addcmul", "addcmul_", "addcdiv", "addcdiv_", "lerp", "lerp_"})
# ``torch.addmm(x, h, w)`` adds ``h @ w`` to ``x``: a sum when ``x`` is computed from the input
# (with a bias parameter in its place, it is a linear layer).
FUSED_MATMUL_SUMS = frozenset({"addmm", "baddbmm", "addbmm", "addmv"})
# ``torch.stack([x, b]).sum(0)`` sums its stacked tensors too.
STACK_REDUCTIONS = frozenset({"sum", "mean"})

# Ops whose results are several tensors cut from one (``chunk``, ``split``, ``unbind``). The
# trace gives each piece a node of its own (op ``PIECE``), so that the pieces can go their own ways.
SPLIT_OPS = frozenset({"split", "split_with_sizes", "unsafe_split", "unsafe_split_with_sizes", "unbind"})
PIECE = "getitem"

# Ops whose arguments the trace keeps (tensors by shape), because which channels of their output
# come from which channels of their input depends on them (channels.py): routing ops, reductions,
# convolutions (their groups) and fused normalizations (what they normalize over).
ROUTING_OPS = frozenset({
    "cat", "stack", "slice", "select", "index_select", "index", "view", "_unsafe_view", "reshape",
    "_reshape_alias", "transpose", "permute", "squeeze", "unsqueeze", "expand", "flip", "roll", "repeat",
    "channel_shuffle", "native_channel_shuffle", "pixel_shuffle", "pixel_unshuffle", "t", "movedim",
    "unflatten", "flatten", "narrow", "as_strided", "diagonal", "unfold", "constant_pad_nd",
}) | SPLIT_OPS
REDUCTION_OPS = frozenset({
    "sum", "mean", "amax", "amin", "max", "min", "var", "std", "var_mean", "std_mean", "norm",
    "linalg_vector_norm", "logsumexp", "prod", "_softmax", "softmax", "_log_softmax", "log_softmax",
    "_safe_softmax", "cumsum", "nansum", "nanmean",
})
CONV_OPS = frozenset({
    "convolution", "_convolution", "conv1d", "conv2d", "conv3d", "mkldnn_convolution", "cudnn_convolution",
    "cudnn_convolution_transpose", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d",
})
RECORDED_OPS = ROUTING_OPS | REDUCTION_OPS | CONV_OPS | NORM_OPS


@lru_cache(maxsize=None)
def base_name(op) -> str:
    """``aten.add_.Tensor`` -> ``add_``; leaves (plain strings) map to themselves."""
    if isinstance(op, str):
        return op
    try:
        return op.overloadpacket.__name__
    except AttributeError:  # higher-order ops and the like
        return str(op)

# Ops whose output does not depend on their inputs' values (only on shape, dtype or device).
# Their input edges are dropped so that, say, ``x.new_ones(...)`` does not look derived from ``x``.
SHAPE_ONLY_OPS = frozenset({
    "new_empty", "new_empty_strided", "new_zeros", "new_ones", "new_full", "empty_like", "zeros_like",
    "ones_like", "full_like", "rand_like", "randn_like", "randint_like", "sym_size", "sym_numel",
    "sym_stride", "sym_storage_offset", "_shape_as_tensor", "size", "stride", "numel", "dim",
    "_local_scalar_dense", "is_nonzero", "equal",
})

# Ops that update running statistics in place although their schema does not mark the
# arguments as written: the positions of ``running_mean`` and ``running_var``, and of the
# flag (``training``, ``use_input_stats``) without which they only read them.
UNMARKED_WRITES = {
    name: ((3, 4), 5)
    for name in ("native_batch_norm", "cudnn_batch_norm", "miopen_batch_norm", "_batch_norm_impl_index",
                 "batch_norm", "instance_norm")
}


class _IsTensorType(dict):
    """type -> is it a tensor type. ``isinstance(a, torch.Tensor)`` costs about 0.24 us when ``a`` is
    not a tensor (an int, a list of sizes: most op arguments), a dict lookup by type a fifth of that,
    and the per-op loops ask it for every argument."""

    def __missing__(self, t: type) -> bool:
        found = self[t] = issubclass(t, torch.Tensor)
        return found


IS_TENSOR = _IsTensorType()  # IS_TENSOR[type(a)]: is op argument ``a`` a tensor
SEQUENCES = frozenset({list, tuple})  # how op arguments hold several values (sizes, tensor lists)
