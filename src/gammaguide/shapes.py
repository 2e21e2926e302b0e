"""Run the ops of a traced forward pass on shapes alone.

Roles come from the dataflow of the forward pass, never from its values, so ``analyze``
runs every op on ``meta`` tensors: shape, dtype and strides, no storage and no arithmetic.
The pass then costs the model's Python overhead and none of its arithmetic (ResNet-50 at
batch 1 on two CPU cores: about a tenth of the forward pass itself, ``bench/analyze_cost.py``'s
meta floor), and no activation is ever allocated. The model is not touched: its inputs are given
as meta twins, and each parameter, buffer or other real tensor gets a meta twin the first time
an op that meets a meta tensor must really run on it. Ops on real tensors alone (a factory
on the CPU, a scalar read of a parameter) still run for real; a factory on the meta device (a
tensor made on the device of the input, as BatchNorm does once a call in eval mode) is made here.

Many meta kernels are Python decompositions (batch norm about 0.5 ms a call, against
0.04 ms for a convolution): the outputs of ops that allocate fresh tensors are remembered by
the shapes, strides and dtypes of their arguments, which is all a meta kernel can depend
on, so each distinct layer shape is inferred once per process. Such a cache hit runs
nothing, so it needs no twins either: on a second analysis, the weights of a plain CNN never
get one. An in-place op returns the tensor it writes into, its shape unchanged, so its meta
kernel only checks that the other arguments fit (``add_``'s is a Python decomposition too): a
signature that passed once is not checked again.

A forward pass that needs values (``.item()``, ``if mask.any():``, ``.cpu()``, an op with no
meta kernel) raises on meta tensors; the caller then runs it for real.
"""

from __future__ import annotations

from typing import Any

import torch

from .ops import IS_TENSOR, MATMUL_OPS, NORM_OPS, SEQUENCES, base_name

META = torch.device("meta")
_UNCACHEABLE = object()
_CACHE_LIMIT = 8192  # distinct (op, argument shapes) signatures; cleared when full
# Every tensor argument in one dtype (embedding's indices are integers: not listed).
SAME_DTYPE_OPS = (MATMUL_OPS | NORM_OPS) - {"embedding", "_embedding_bag", "embedding_bag", "_scaled_mm"}


def _allocates_fresh(func) -> bool:
    """No argument or result of ``func`` aliases another: its outputs are new tensors whose
    shapes, strides and dtypes a cache can reproduce."""
    schema = func._schema
    return not any(a.alias_info is not None for a in schema.arguments) and not any(
        r.alias_info is not None for r in schema.returns
    )


# In-place ops that change the shape or strides of the tensor they write into.
_RESHAPING_IN_PLACE = frozenset({
    "resize_", "resize_as_", "t_", "transpose_", "unsqueeze_", "squeeze_", "as_strided_", "set_", "swapdims_",
    "swapaxes_",
})


def _in_place_keeping_shape(func) -> bool:
    """``relu_``, ``hardswish_``, ``clamp_``, ``fill_``...: an op that writes its result into its
    first argument, whose shape and strides it keeps. Given that one tensor alone, on meta it
    changes nothing a meta tensor has, so it need not run (``hardswish_``'s meta kernel is a
    Python decomposition: a quarter of MobileNetV3's pass)."""
    schema = func._schema
    first = schema.arguments[0] if schema.arguments else None
    return (
        first is not None and first.alias_info is not None and first.alias_info.is_write
        and len(schema.returns) == 1 and base_name(func) not in _RESHAPING_IN_PLACE
    )


def tensor_spec(t: torch.Tensor) -> tuple:
    return (t.shape, t.stride(), t.dtype)


def empty_from_spec(spec: tuple) -> torch.Tensor:
    """A new meta tensor of ``tensor_spec``'s shape, strides and dtype."""
    return torch.empty_strided(spec[0], spec[1], dtype=spec[2], device=META)


def _out_spec(out: Any) -> Any:
    if isinstance(out, torch.Tensor):
        return tensor_spec(out)
    if isinstance(out, (list, tuple)) and all(isinstance(o, torch.Tensor) or o is None for o in out):
        return tuple(None if o is None else tensor_spec(o) for o in out)
    return _UNCACHEABLE


def _rebuild(spec: Any, func_returns_list: bool) -> Any:
    if spec and isinstance(spec[0], torch.Size):  # one tensor
        return empty_from_spec(spec)
    outs = [None if s is None else empty_from_spec(s) for s in spec]
    return outs if func_returns_list else tuple(outs)


def _check_dtypes(func, args: tuple) -> None:
    """Meta kernels check shapes but not always dtypes: a float64 image into a float32 conv runs on
    meta and fails for real. Ops that multiply by a weight or normalize with one need their
    tensors in one dtype; mixed ones are sent to the real pass, which accepts (bfloat16 input
    with float32 batch-norm statistics) or rejects them with PyTorch's own message."""
    if base_name(func) not in SAME_DTYPE_OPS:
        return
    dtypes = {a.dtype for a in args if isinstance(a, torch.Tensor)}
    if len(dtypes) > 1:
        raise TypeError(f"{base_name(func)} with mixed dtypes {sorted(map(str, dtypes))}")


# id(op) -> (op, allocates fresh outputs, writes into its first argument keeping its shape); holding
# the op keeps its id from being reused by another.
_KINDS: dict[int, tuple[Any, bool, bool]] = {}


def _kind(func) -> tuple[Any, bool, bool]:
    kind = _KINDS.get(id(func))
    if kind is None or kind[0] is not func:
        kind = _KINDS[id(func)] = (func, _allocates_fresh(func), _in_place_keeping_shape(func))
    return kind


def allocates_or_keeps_shape(func) -> bool:
    """Does ``func`` make new tensors or write into its first argument keeping its shape (no view,
    no other aliasing): is its meta result rebuilt from its shape alone?"""
    _, fresh, in_place = _kind(func)
    return fresh or in_place


class MetaRunner:
    """Runs one op on meta twins of its tensor arguments; one per traced forward pass."""

    _cache: dict[tuple, Any] = {}  # shared by every runner: layer shapes recur across analyses
    _checked: set[tuple] = set()  # signatures of in-place ops (see ``__call__``) whose arguments passed

    def __init__(self) -> None:
        # id(real tensor) -> (real tensor, its twin); holding the real keeps its id unique.
        self.twins: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def twin(self, t: torch.Tensor) -> torch.Tensor:
        if t.is_meta:
            return t
        e = self.twins.get(id(t))
        if e is None or e[0] is not t:
            e = self.twins[id(t)] = (t, empty_from_spec(tensor_spec(t)))
        return e[1]

    def to_meta(self, obj: Any) -> Any:
        """``obj`` with every tensor in nested tuples, lists and dicts swapped for its twin."""
        if isinstance(obj, torch.Tensor):
            return self.twin(obj)
        if isinstance(obj, tuple):
            return tuple(self.to_meta(o) for o in obj)
        if isinstance(obj, list):
            return [self.to_meta(o) for o in obj]
        if isinstance(obj, dict):
            return {k: self.to_meta(v) for k, v in obj.items()}
        return obj

    def _twin_list(self, a: list | tuple) -> list | tuple:
        # Tensor lists (``cat``'s) become lists of twins; sizes and strides pass as they are.
        if any(isinstance(b, torch.Tensor) for b in a):
            return [self.twin(b) if isinstance(b, torch.Tensor) else b for b in a]
        return a

    def spec_of(self, a: torch.Tensor) -> tuple:
        """All a meta kernel can see of tensor ``a``: shape, strides, dtype. Read off its twin where it
        has one (an in-place op may have reshaped the twin) and off the tensor itself where not: a
        real tensor and its twin-to-be have the same ones, so a cache hit needs no twins at all."""
        if not a.is_meta:
            e = self.twins.get(id(a))
            if e is not None and e[0] is a:
                a = e[1]
        return (a.shape, a.stride(), a.dtype)

    def _key(self, args: tuple | list) -> tuple:
        """A hashable stand-in for each argument: ``spec_of`` a tensor, the value of anything else."""
        spec_of, out = self.spec_of, []
        for a in args:
            if IS_TENSOR[type(a)]:
                out.append(spec_of(a))
            elif type(a) in SEQUENCES:
                # Sizes, strides, paddings: a list of ints is its own key (a tensor list never starts with one).
                out.append(tuple(a) if a and type(a[0]) is int else self._key(a))
            else:
                out.append(a)
        return tuple(out)

    def _run(self, func, args: tuple, kwargs: dict | None) -> Any:
        """``func`` on meta twins of its tensor arguments."""
        twin = self.twin
        args = tuple(
            twin(a) if IS_TENSOR[type(a)]
            else self._twin_list(a) if type(a) in SEQUENCES
            else a
            for a in args
        )
        if kwargs:
            kwargs = {k: twin(v) if IS_TENSOR[type(v)] else v for k, v in kwargs.items()}
            return func(*args, **kwargs)
        return func(*args)

    def __call__(self, func, args: tuple, kwargs: dict | None) -> Any:
        _, fresh, in_place = _kind(func)
        if not fresh and not in_place:  # views and other aliasing ops: run on twins every time
            return self._run(func, args, kwargs)
        if in_place and not kwargs and sum(IS_TENSOR[type(a)] for a in args) == 1:
            return self.twin(args[0])  # the meta tensor it writes into is its result, unchanged
        # The default dtype decides the result of, say, dividing integer tensors.
        key = (func, self._key(args), self._key(tuple(kwargs.items())) if kwargs else None, torch.get_default_dtype())
        if in_place:
            return self._in_place(func, args, kwargs, key)
        try:
            spec = self._cache.get(key)
        except TypeError:  # an argument that does not hash: run it every time
            return self._run(func, args, kwargs)
        if spec is None:
            _check_dtypes(func, args)
            out = self._run(func, args, kwargs)
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache.clear()
            self._cache[key] = (_out_spec(out), isinstance(out, list))
            return out
        out_spec, is_list = spec
        if out_spec is _UNCACHEABLE:
            return self._run(func, args, kwargs)
        return _rebuild(out_spec, is_list)

    def _in_place(self, func, args: tuple, kwargs: dict | None, key: tuple) -> Any:
        """An in-place op given other tensors too (``add_``): its result is still the tensor it writes
        into, shape unchanged, and its meta kernel only checks that the others fit (an ``add_`` that
        would have to broadcast its target fails). Once a signature passed, it needs no check."""
        try:
            checked = key in self._checked
        except TypeError:  # an argument that does not hash
            return self._run(func, args, kwargs)
        if checked:
            return self.twin(args[0])
        out = self._run(func, args, kwargs)
        if len(self._checked) >= _CACHE_LIMIT:
            self._checked.clear()
        self._checked.add(key)
        return out
