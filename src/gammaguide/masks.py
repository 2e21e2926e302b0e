"""Sets of elements of a tensor, and how reshapes, transposes and slices move them (channels.py).

A **mask** is a set of elements of a tensor: ``None`` (none), ``ALL`` (all), or a ``Part``: a run
of consecutive dimensions, counted from the right (so that broadcasting leaves it valid), and a
bit set over the row-major index of those dimensions; the set is the same along every other
dimension. A **reach** is a pair of masks: the elements that are a γ's output scaled (``s``) and
the elements where it was mixed with other features (``m``). Masks are kept canonical (``part``):
the smallest run of dimensions, ``None`` for no element, ``ALL`` for every one.

Masks are values (a ``Part`` is frozen and hashable), so ``part`` and the moves (``reshape``,
``permute``, ``take``) are memoized: the walks from the norms of repeated blocks move the same
masks through the same shapes (ShuffleNetV2's channel shuffles: a quarter of its walks' time),
and a second analysis of a model moves them all again. The caches are bounded (``_MEMO``
entries each); a mask's bits are at most one per element of the dimensions it varies along.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from functools import lru_cache

ALL = True
_MEMO = 1024  # entries kept by each memoized function


@dataclass(frozen=True, slots=True)
class Part:
    """Some elements: bit ``k`` of ``bits`` is the element whose index over ``dims`` (negative,
    consecutive, with ``sizes``) flattens to ``k``; the same along every other dimension."""

    dims: tuple[int, ...]
    sizes: tuple[int, ...]
    bits: int


Reach = tuple  # (s, m): two masks, each None, ALL or a Part
NOTHING: Reach = (None, None)
START: Reach = (ALL, None)  # a normalization's own output, scaled by its γ


def ones(n: int) -> int:
    return (1 << n) - 1


# Moving bits one by one is a Python loop; as a string of "0" and "1" (character k is bit k) the
# same moves are slices, joins and translations that run in C.
def _text(bits: int, n: int) -> str:
    return format(bits, f"0{n}b")[::-1]


def _bits(text: str) -> int:
    return int(text[::-1], 2) if text else 0


@lru_cache(maxsize=64)
def _repeat(times: int) -> dict[int, str]:
    """A ``str.translate`` table repeating each bit ``times`` times."""
    return {ord("0"): "0" * times, ord("1"): "1" * times}


@lru_cache(maxsize=_MEMO)
def part(dims: tuple[int, ...], sizes: tuple[int, ...], bits: int):
    """The canonical mask of ``bits`` over ``dims``: ``None``, ``ALL`` or the smallest ``Part``."""
    n = math.prod(sizes)
    full = ones(n)
    bits &= full
    if bits == 0:
        return None
    if bits == full:
        return ALL
    dims, sizes = list(dims), list(sizes)
    while len(dims) > 1:  # the first dimension, where every slice along it is the same
        inner = math.prod(sizes[1:])
        first = bits & ones(inner)
        if bits != first * (ones(inner * sizes[0]) // ones(inner)):  # ``first`` repeated, as a number
            break
        bits, dims, sizes = first, dims[1:], sizes[1:]
    while len(dims) > 1:  # the last dimension, where each run along it is all in or all out
        last, text = sizes[-1], _text(bits, math.prod(sizes))
        kept = text[::last]
        if kept.translate(_repeat(last)) != text:
            break
        bits, dims, sizes = _bits(kept), dims[:-1], sizes[:-1]
    return Part(tuple(dims), tuple(sizes), bits)


def union(a, b):
    if a is None or b is ALL:
        return b
    if b is None or a is ALL:
        return a
    if a.dims == b.dims and a.sizes == b.sizes:
        return part(a.dims, a.sizes, a.bits | b.bits)
    return ALL  # two differently shaped parts: coarser, never smaller


def inter(a, b):
    if a is None or b is None:
        return None
    if a is ALL:
        return b
    if b is ALL:
        return a
    if a.dims == b.dims and a.sizes == b.sizes:
        return part(a.dims, a.sizes, a.bits & b.bits)
    return None


def minus(a, b):
    """``a`` without ``b``."""
    if a is None or b is None:
        return a
    if b is ALL:
        return None
    if a is ALL:
        return part(b.dims, b.sizes, ones(math.prod(b.sizes)) ^ b.bits)
    if a.dims == b.dims and a.sizes == b.sizes:
        return part(a.dims, a.sizes, a.bits & ~b.bits)
    return a


def reach_union(a: Reach, b: Reach) -> Reach:
    return union(a[0], b[0]), union(a[1], b[1])


def mixed_wins(s, m) -> Reach:
    """Mixed wins: an element both scaled and mixed is mixed."""
    return minus(s, m), m


def touches(mask, dims: set[int]) -> bool:
    """Does the part vary along one of ``dims`` (negative)? ``ALL`` and ``None`` vary along none."""
    return isinstance(mask, Part) and any(d in dims for d in mask.dims)


# ----------------------------------------------------------------------------- bit-level moves


def _gather(bits: int, sizes: tuple[int, ...], t: int, keep) -> tuple[int, tuple[int, ...]]:
    """``bits`` with dimension ``t`` of ``sizes`` restricted to the indices ``keep``, in order."""
    inner = math.prod(sizes[t + 1:])
    if t == 0 and isinstance(keep, range) and keep.step == 1:  # a slice of rows: one shift
        return (bits >> (keep.start * inner)) & ones(len(keep) * inner), (len(keep),) + sizes[1:]
    keep = list(keep)
    outer, size, text = math.prod(sizes[:t]), sizes[t], _text(bits, math.prod(sizes))
    kept = "".join(text[(o * size + i) * inner:(o * size + i + 1) * inner] for o in range(outer) for i in keep)
    return _bits(kept), sizes[:t] + (len(keep),) + sizes[t + 1:]


def spread(bits: int, n: int, pre: int, post: int) -> int:
    """Bits over ``n`` elements, as bits over ``pre * n * post`` (each repeated ``post`` times in
    a run, the whole repeated ``pre`` times)."""
    if pre == 1 and post == 1:
        return bits
    text = _text(bits, n)
    if post > 1:
        text = text.translate(_repeat(post))
    return _bits(text * pre)


def _groups(a: tuple[int, ...], b: tuple[int, ...]):
    """The dimensions of shapes ``a`` and ``b`` (same number of elements) in matching runs with
    equal products: a reshape moves elements only within a run. None when there are none."""
    groups, i, j = [], 0, 0
    while i < len(a) or j < len(b):
        i0, j0, pa, pb = i, j, 1, 1
        if i < len(a):
            pa, i = a[i], i + 1
        if j < len(b):
            pb, j = b[j], j + 1
        while pa != pb:
            if pa < pb and i < len(a):
                pa, i = pa * a[i], i + 1
            elif pb < pa and j < len(b):
                pb, j = pb * b[j], j + 1
            else:
                return None
        groups.append(((i0, i), (j0, j)))
    return groups


# ----------------------------------------------------------------------------- mask moves


def reshape(mask, src: tuple[int, ...], dst: tuple[int, ...]):
    return _reshape(mask, tuple(src), tuple(dst)) if isinstance(mask, Part) else mask


@lru_cache(maxsize=_MEMO)
def _reshape(mask: Part, src: tuple[int, ...], dst: tuple[int, ...]):
    if math.prod(src) != math.prod(dst) or 0 in src:
        return ALL
    groups = _groups(src, dst)
    if groups is None:
        return ALL
    rs, rd = len(src), len(dst)
    b0, b1 = rs + mask.dims[0], rs + mask.dims[-1] + 1
    covering = [g for g in groups if g[0][0] < b1 and g[0][1] > b0]
    i0, i1 = covering[0][0][0], covering[-1][0][1]
    j0, j1 = covering[0][1][0], covering[-1][1][1]
    if j0 == j1:
        return ALL
    bits = spread(mask.bits, math.prod(mask.sizes), math.prod(src[i0:b0]), math.prod(src[b1:i1]))
    return part(tuple(j - rd for j in range(j0, j1)), tuple(dst[j0:j1]), bits)


def permute(mask, shape: tuple[int, ...], perm: list[int]):
    """Output dimension ``k`` is input dimension ``perm[k]`` (of an input of ``shape``)."""
    return _permute(mask, tuple(shape), tuple(perm)) if isinstance(mask, Part) else mask


_WIDEST = 1 << 18  # bits a part widened for a permutation may have; beyond, it is coarsened to ALL


@lru_cache(maxsize=_MEMO)
def _permute(mask: Part, shape: tuple[int, ...], perm: tuple[int, ...]):
    rank = len(shape)
    perm = [p % rank for p in perm]
    while True:
        pos = [perm.index(rank + d) for d in mask.dims]
        lo, hi = min(pos), max(pos)
        if hi - lo + 1 == len(pos):
            break
        # The dimensions part ways. The part is the same along every other dimension, so it is also
        # a part over the dimensions that land between them (and those between those in the input).
        wanted = [perm[k] - rank for k in range(lo, hi + 1)]
        first, last = min(wanted), max(wanted)
        sizes = tuple(shape[rank + d] for d in range(first, last + 1))
        if math.prod(sizes) > _WIDEST:
            return ALL  # coarser
        a, b = mask.dims[0] - first, mask.dims[-1] - first + 1
        bits = spread(mask.bits, math.prod(mask.sizes), math.prod(sizes[:a]), math.prod(sizes[b:]))
        mask = Part(tuple(range(first, last + 1)), sizes, bits)
    order = sorted(range(len(pos)), key=lambda t: pos[t])
    sizes = tuple(mask.sizes[t] for t in order)
    bits = mask.bits
    if order != list(range(len(pos))):  # a transpose within the part (a channel shuffle)
        picked = _gatherer(mask.sizes, tuple(order))(_text(bits, math.prod(mask.sizes)))
        bits = _bits("".join(picked))
    return part(tuple(p - rank for p in range(lo, lo + len(pos))), sizes, bits)


@lru_cache(maxsize=256)
def _permutation(sizes: tuple[int, ...], order: tuple[int, ...]) -> list[int]:
    """For each row-major index over the dimensions put in ``order``, the index over ``sizes``
    it comes from."""
    new_sizes = [sizes[t] for t in order]
    strides = [math.prod(sizes[t + 1:]) for t in range(len(sizes))]
    table = []
    for flat in range(math.prod(new_sizes)):
        rest, source = flat, 0
        for i in reversed(range(len(order))):
            source += (rest % new_sizes[i]) * strides[order[i]]
            rest //= new_sizes[i]
        table.append(source)
    return table


@lru_cache(maxsize=256)
def _gatherer(sizes: tuple[int, ...], order: tuple[int, ...]):
    """Picks, from a mask's text, its characters in the permuted order (in C)."""
    return operator.itemgetter(*_permutation(sizes, order))


def take(mask, rank: int, dim: int, keep, drop: bool = False):
    """The elements at indices ``keep`` of dimension ``dim`` (``drop``: and that dimension removed,
    as ``select`` does)."""
    if not isinstance(mask, Part):
        return mask
    return _take(mask, rank, dim, keep if type(keep) is range else tuple(keep), drop)


@lru_cache(maxsize=_MEMO)
def _take(mask: Part, rank: int, dim: int, keep: range | tuple[int, ...], drop: bool):
    d = dim % rank - rank
    if d not in mask.dims:
        if drop and d > mask.dims[-1]:
            return Part(tuple(x + 1 for x in mask.dims), mask.sizes, mask.bits)
        return mask
    t = mask.dims.index(d)
    bits, sizes = _gather(mask.bits, mask.sizes, t, keep)
    dims = mask.dims
    if drop:
        dims = tuple(x + 1 for x in dims[:t]) + dims[t + 1:]
        sizes = sizes[:t] + sizes[t + 1:]
        if not sizes:
            return ALL if bits else None
    return part(dims, sizes, bits)


def drop_reduced(mask, rank: int, dims: set[int], keepdim: bool):
    """A mask that does not vary along the reduced ``dims`` (negative), after the reduction."""
    if not isinstance(mask, Part) or keepdim:
        return mask
    shift = sum(1 for r in dims if r > mask.dims[-1])
    return Part(tuple(x + shift for x in mask.dims), mask.sizes, mask.bits)


def place(mask, shape: tuple[int, ...], dim: int, offset: int, size: int):
    """An input's mask in the output (of ``shape``) of a concatenation along ``dim``, where the input
    takes the indices ``offset .. offset + size``."""
    if mask is None:
        return None
    rank = len(shape)
    d = dim % rank - rank
    if not isinstance(mask, Part) or mask.dims == (d,):
        return part((d,), (shape[d],), (mask.bits if isinstance(mask, Part) else ones(size)) << offset)
    return _place(mask, tuple(shape), d, offset, size)


@lru_cache(maxsize=_MEMO)
def _place(mask: Part, shape: tuple[int, ...], d: int, offset: int, size: int):
    # A part that varies along other dimensions keeps them: the run of dimensions from the part's
    # to ``d`` (a channel mask of a piece concatenated along the width is not the whole piece).
    rank = len(shape)
    dims = tuple(range(min(mask.dims[0], d), max(mask.dims[-1], d) + 1))
    sizes = tuple(shape[rank + x] for x in dims)
    t = dims.index(d)
    own = sizes[:t] + (size,) + sizes[t + 1:]  # the input's sizes over those dimensions
    a, b = dims.index(mask.dims[0]), dims.index(mask.dims[-1]) + 1
    text = _text(spread(mask.bits, math.prod(mask.sizes), math.prod(own[:a]), math.prod(own[b:])), math.prod(own))
    inner = math.prod(sizes[t + 1:])
    before, after = "0" * (offset * inner), "0" * ((sizes[t] - offset - size) * inner)
    chunk = size * inner
    placed = "".join(before + text[o * chunk:(o + 1) * chunk] + after for o in range(math.prod(sizes[:t])))
    return part(dims, sizes, _bits(placed))


def unsqueeze(mask, rank: int, dim: int):
    """The mask after a dimension of size 1 is inserted at ``dim`` of the result (of ``rank``)."""
    new = dim % rank - rank
    if not isinstance(mask, Part) or new < mask.dims[0]:
        return mask  # inserted left of the part's dimensions, which keep their places from the right
    left = sum(1 for x in mask.dims if x <= new)  # the dimensions left of the new one move one place left
    dims = tuple(x - 1 for x in mask.dims[:left]) + ((new,) if left < len(mask.dims) else ()) + mask.dims[left:]
    sizes = mask.sizes[:left] + ((1,) if left < len(mask.dims) else ()) + mask.sizes[left:]
    return Part(dims, sizes, mask.bits)  # a dimension of size 1 inside the part leaves its row-major order
