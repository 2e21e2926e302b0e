"""Sums in the traced graph, and which of their operands is the skip.

A **sum** is one addition or a chain of them: ``h + f(h) + g(h)``, ``f(h) + g(h) + h`` and an
in-place ``out += g(h); out += h`` are one sum of three operands, however they are written. Its
ops are the additions of the chain (``+``, ``+=``, ``torch.add`` with any ``alpha``, ``add_``,
``-`` and ``sub``, which add a negated operand, ``x.addcmul(b, t)`` and ``addcdiv``, which add
``b * t`` and ``b / t``, ``x.lerp(y, w)``, ``torch.addmm(x, h, w)`` with ``x`` computed from the
input, which adds ``h @ w``, Python's ``sum([...])``, and ``torch.stack([...]).sum(0)`` or
``.mean(0)``); an addition belongs
to the chain of the op that consumes its result when that op is an addition too and nothing else
uses the result. The **operands** are the tensors added that are computed from the model's
input: adding a parameter, a buffer or a constant (a bias, a positional embedding) adds no operand.

The **fork** of a sum is the nearest common ancestor of its operands; each operand counts the
weighted ops (conv, linear, embedding, normalization) on its longest path from the stream: from
the fork or from the result of an earlier residual sum, whichever the path meets last (in a
multi-resolution fusion such as HRNet's, each branch's own stream is the output of its last block,
not the fork far back where the branches parted). A sum is **residual** when exactly one operand
has the fewest (equal counts are told apart by the weighted ops since the fork alone): that operand
carries the stream and is the **skip**; every other operand is a **branch**. Three exceptions
have no skip:

- a tie (``x + x``, ``conv1(x) + conv2(x)``);
- a **sum of heads**: every operand ends in a conv or linear layer (computed outputs, such as two
  classifiers' logits) and the sum reaches the model output with no weighted op, normalization or
  other sum in between;
- a **sum inside a branch**: no operand is an identity path (each has a weighted op since the
  stream), and the sum's result goes on into a branch of a later residual sum before it meets a
  normalization or the skip of any residual sum. A parallel block's ``attn_out(a) + mlp_out(m)``
  before ``x + ls(...)``, or FocalNet's sum of gated context levels, is part of one branch.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

from .channels import reduced_dims, transfer
from .flow import Flow
from .masks import ALL, Part, part, place
from .ops import FUSED_MATMUL_SUMS, MATMUL_OPS, STACK_REDUCTIONS, SUM_OPS
from .trace import INPUT, LEAF_KINDS

# Ops whose arguments 1 and 2 make one operand together (``b * t``, ``b / t``, ``h @ w``, and
# ``lerp``'s end and weight).
_PRODUCT = frozenset({"addcmul", "addcmul_", "addcdiv", "addcdiv_", "lerp", "lerp_"}) | FUSED_MATMUL_SUMS


@dataclass(frozen=True)
class Operand:
    """One tensor added by a sum: argument ``pos`` of op ``node`` (``addcmul``'s product is the
    one operand at its positions 1 and 2), computed from the collapsed nodes ``sources``."""

    node: int
    pos: int
    sources: tuple[int, ...]
    weighted: int = 0  # weighted ops on its longest path from the stream
    extra: int = 0  # weighted ops the sum's op itself adds to it (the product of ``addmm``)


@dataclass(frozen=True)
class Sum:
    node: int  # the op whose result is the sum
    members: tuple[int, ...]  # the ops of the chain
    operands: tuple[Operand, ...]
    fork: int  # the nearest common ancestor of the operands
    skip: int  # index of the skip operand

    @property
    def branches(self) -> tuple[Operand, ...]:
        return tuple(o for i, o in enumerate(self.operands) if i != self.skip)


class Sums:
    """Every sum of the graph, and where each of their operands enters."""

    def __init__(self, flow: Flow):
        self.flow = flow
        chains = list(_chains(flow))
        inside: set[int] = set()  # sums inside a branch, found so far
        while True:
            self.sums: list[Sum] = []  # the residual sums, in execution order
            self.not_residual: dict[int, str] = {}  # every other sum's last op -> why it has no skip
            streams: set[int] = set()  # results of the residual sums so far
            for root, members, operands in chains:
                found = _resolve(flow, root, members, operands, streams, root in inside)
                if isinstance(found, str):
                    self.not_residual[root] = found
                    continue
                self.sums.append(found)
                streams.add(found.node)
            self._index()
            more = {s.node for s in reversed(self.sums) if min(o.weighted for o in s.operands) > 0
                    and self._feeds_a_branch(s)}
            if more <= inside:
                break
            inside |= more

    def _index(self) -> None:
        self._operand: dict[tuple[int, int], tuple[Sum, int]] = {}
        self._member: dict[int, Sum] = {}
        for s in self.sums:
            for m in s.members:
                self._member[m] = s
            for i, o in enumerate(s.operands):
                self._operand[(o.node, o.pos)] = (s, i)
                if o.pos == 1 and self.flow.names[o.node] in _PRODUCT:
                    self._operand[(o.node, 2)] = (s, i)  # the product's other factor

    def _feeds_a_branch(self, s: Sum) -> bool:
        """Does the result of ``s`` go on into a branch of a later residual sum before it meets a
        normalization or the skip of one?"""
        flow, branch = self.flow, False
        stack, seen = [s.node], {s.node}
        while stack:
            n = stack.pop()
            for t, pos in flow.succ[n]:
                if t in seen or t in flow.norm_name:
                    continue
                # A later residual sum is entered at one of its operands (``_chains`` makes every other
                # argument of a chain's op a link between its members, or not computed from the input).
                found = self._operand.get((t, pos))
                if found is not None:
                    if found[1] == found[0].skip:
                        return False  # the stream goes on through it
                    branch = True
                    continue
                seen.add(t)
                stack.append(t)
        return branch

    def residual(self) -> list[Sum]:
        return self.sums

    def member(self, node: int) -> Sum | None:
        """The residual sum whose chain ``node`` belongs to."""
        return self._member.get(node)

    def operand_at(self, node: int, pos: int) -> tuple[Sum, int] | None:
        """The residual sum and operand index that argument ``pos`` of op ``node`` is."""
        return self._operand.get((node, pos))


_MAYBE_MEMBER = SUM_OPS | FUSED_MATMUL_SUMS | STACK_REDUCTIONS  # the ops ``_is_member`` can accept


def _is_member(flow: Flow, i: int) -> bool:
    """Can op ``i`` be part of a sum? (Ops inside a normalization are not.)"""
    if flow.rep[i] != i or i in flow.norm_name or not flow.graph.is_float[i]:
        return False
    name = flow.names[i]
    if name in SUM_OPS:
        return True
    if name in FUSED_MATMUL_SUMS:
        return bool(flow.graph.ins[i]) and flow.act[flow.rep[flow.graph.ins[i][0]]]
    return name in STACK_REDUCTIONS and _stacked(flow, i) is not None


# Ops that only lay out the elements of one tensor anew, between a concatenation (or stack) and the
# reduction that adds its pieces: ``torch.cat([x, b]).view(2, *x.shape).sum(0)``, the ``permute``
# of an ``einsum('k...->...', torch.stack([x, b]))``.
_LAYOUT = frozenset({
    "view", "_unsafe_view", "reshape", "_reshape_alias", "permute", "transpose", "t", "unsqueeze", "squeeze",
    "flatten", "unflatten", "clone", "contiguous", "alias", "movedim",
})
_UNSQUEEZES = frozenset({"unsqueeze", "view", "_unsafe_view", "reshape", "_reshape_alias"})


def _stacked(flow: Flow, i: int) -> tuple[tuple[int, ...], tuple[tuple[int, int, int], ...]] | None:
    """When reduction ``i`` (a sum or mean) adds whole tensors laid side by side by a ``stack`` or
    ``cat``, however the result was reshaped or permuted on the way: the ops between (the stack
    included) and each added tensor as (op, argument position, the tensor's node). Each tensor
    must take exactly one index along the reduced dimensions, the same everywhere else."""
    key = ("stacked", i)
    if key not in flow.memo:
        flow.memo[key] = _find_stacked(flow, i)
    return flow.memo[key]


def _find_stacked(flow: Flow, i: int):
    graph, names, succ, rep = flow.graph, flow.names, flow.succ, flow.rep
    ins, record = graph.ins[i], graph.args.get(i)
    if record is None or len(ins) != 1:
        return None
    chain, k = [], ins[0]
    while names[k] in _LAYOUT and rep[k] == k and len(graph.ins[k]) == 1 and len(succ[k]) == 1:
        chain.append(k)
        k = graph.ins[k][0]
    stacked = graph.args.get(k)
    if names[k] not in ("stack", "cat") or stacked is None or rep[k] != k or len(succ[k]) != 1:
        return None
    args, shape = record[0], record[1]
    rank = len(args[0].shape)
    dims, keepdim, _ = reduced_dims(names[i], args, rank, record[2])
    pieces, out_shape, kw = stacked[0][0], stacked[1], stacked[2] or {}
    if keepdim or not isinstance(pieces, list) or len(pieces) != len(graph.ins[k]):
        return None
    dim = stacked[0][1] if len(stacked[0]) > 1 else kw.get("dim", 0)
    out_rank = len(out_shape)
    d, total, offset = dim % out_rank, out_shape[dim % out_rank], 0
    found = []
    for pos, piece in enumerate(pieces):
        if names[k] == "stack":
            mask = part((d - out_rank,), (total,), 1 << pos)
        else:
            size = piece.shape[d] if len(piece.shape) == out_rank else 0
            mask = place(ALL, out_shape, d, offset, size)
            offset += size
        for n in reversed(chain):  # where the piece's elements end up in the reduction's input
            mask, mixed = transfer(flow, n, {0: (mask, None)})
            if mixed is not None:
                return None
        if not isinstance(mask, Part) or set(mask.dims) != dims or mask.bits & (mask.bits - 1):
            return None  # it does not take exactly one index along the reduced dimensions
        node, at, source = k, pos, graph.ins[k][pos]
        if tuple(piece.shape) != tuple(shape):  # ``x.unsqueeze(-1)``: the tensor added is ``x``
            if not (names[source] in _UNSQUEEZES and rep[source] == source and len(graph.ins[source]) == 1
                    and len(succ[source]) == 1 and graph.args.get(source) is not None
                    and tuple(graph.args[source][0][0].shape) == tuple(shape)):
                return None
            node, at, source = source, 0, graph.ins[source][0]
        found.append((node, at, source))
    nodes = tuple(chain) + (k,) + tuple(n for n, _, _ in found if n != k)
    return nodes, tuple(found)


def _chains(flow: Flow):
    """(last op, ops, operands) of every chain of additions."""
    # By name first: most ops cannot be a member, and this runs over every node of every analysis.
    members = [i for i, name in enumerate(flow.names) if name in _MAYBE_MEMBER and _is_member(flow, i)]
    is_member = set(members)
    parent: dict[int, int] = {}
    for i in members:
        consumers = flow.succ[i]
        if len(consumers) == 1 and i not in flow.outputs:
            (c, _pos), = consumers
            if c in is_member:
                parent[i] = c
    # A stack or cat summed away is part of its reduction's chain: the tensors it lays side by side are the
    # operands.
    stacks = {i: _stacked(flow, i) for i in members if flow.names[i] in STACK_REDUCTIONS}
    for i in members:
        if i in parent:
            continue
        chain: list[int] = []
        operands: list[Operand] = []
        _gather(flow, i, parent, stacks, chain, operands)
        if len(operands) >= 2:
            yield i, tuple(sorted(chain)), tuple(operands)


def _gather(flow: Flow, i: int, parent: dict[int, int], stacks: dict, chain: list[int], operands: list[Operand]):
    chain.append(i)
    ins, rep, act = flow.graph.ins, flow.rep, flow.act
    stack = stacks.get(i)
    if stack is not None:
        nodes, added = stack
        chain.extend(nodes)
        for node, pos, k in added:
            if act[rep[k]]:
                operands.append(Operand(node, pos, (rep[k],)))
        return
    product = flow.names[i] in _PRODUCT
    for pos, k in enumerate(ins[i]):
        if product and pos == 2:
            continue  # taken with position 1
        if parent.get(k) == i and rep[k] == k:
            _gather(flow, k, parent, stacks, chain, operands)
            continue
        if product and pos == 1:
            sources = tuple(rep[x] for x in ins[i][1:3] if act[rep[x]])
            if sources:
                operands.append(Operand(i, 1, sources, extra=int(flow.weighted[i])))
        elif act[rep[k]]:
            operands.append(Operand(i, pos, (rep[k],)))


def _resolve(flow: Flow, root: int, members: tuple[int, ...], operands: tuple[Operand, ...],
             streams: set[int], inside: bool) -> Sum | str:
    """The residual sum, or why the chain is no residual sum: "no fork", "conditioning", "tie", "heads"
    or "inside a branch"."""
    fork, embedding = _fork(flow, operands), None
    if fork is None:
        found = _without_an_embedding(flow, operands)
        if found is None:
            return "no fork"
        fork, embedding = found
    counts = _from_stream(flow, operands, fork, streams)
    operands = tuple(Operand(o.node, o.pos, o.sources, c, o.extra) for o, c in zip(operands, counts, strict=True))
    conditioning = _conditioning(flow, operands, fork, streams) | ({embedding} if embedding is not None else set())
    if len(operands) - len(conditioning) < 2:
        return "conditioning"
    # A conditioning operand never carries the stream: it is no candidate for the skip.
    ranks = [(c, 0) if i not in conditioning else (len(flow), 0) for i, c in enumerate(counts)]
    low = min(ranks)
    if ranks.count(low) > 1:
        since_fork = _from_stream(flow, operands, fork, set())
        ranks = [(r[0], f) for r, f in zip(ranks, since_fork, strict=True)]
        low = min(ranks)
        if ranks.count(low) > 1:
            return "tie"
    counts = ranks
    if _sum_of_heads(flow, root, operands):
        return "heads"
    if inside:
        return "inside a branch"
    return Sum(root, members, operands, fork, counts.index(low))


def _conditioning(flow: Flow, operands: tuple[Operand, ...], fork: int, streams: set[int]) -> set[int]:
    """The operands that are an embedding of another input (a diffusion U-Net's ``time_mlp(t)``, a
    class embedding, a FiLM shift added to a block's features): computed without some model input
    that another operand is computed from, and without the stream that other operand is computed
    from (an earlier residual sum's result after the fork, such as the previous block's output,
    which the embedding only reached through a branch). Such an operand never carries the stream.
    Models with one input (every operand computed from it) have none."""
    inputs = _inputs(flow)
    if inputs is None:
        return set()
    found: set[int] = set()
    sets = [_union(inputs, o.sources) for o in operands]
    for b, other in enumerate(operands):
        for c, cand in enumerate(operands):
            if c == b or c in found or sets[b] & ~sets[c] == 0:
                continue  # ``cand`` is computed from every input ``other`` is
            for s in _streams_behind(flow, other.sources, fork, streams):
                if s not in cand.sources and not any(flow.is_ancestor(s, x) for x in cand.sources):
                    found.add(c)
                    break
    return found


def _without_an_embedding(flow: Flow, operands: tuple[Operand, ...]) -> tuple[int, int] | None:
    """For a sum of three or more operands with no common ancestor, in a model with several inputs
    (the first block of a U-Net that adds a time embedding in its residual sum itself): the fork of
    the others and the operand that is an embedding of another input, computed without an input
    another operand uses. Of several such operands, the one whose removal leaves an identity skip
    (the fork is an operand), then the nearest fork. None when there is none."""
    inputs = _inputs(flow)
    if inputs is None or len(operands) < 3:
        return None
    sets = [_union(inputs, o.sources) for o in operands]
    best, key = None, None
    for c in range(len(operands)):
        if not any(sets[b] & ~sets[c] for b in range(len(operands)) if b != c):
            continue  # computed from every input the others are: not an embedding of another one
        rest = operands[:c] + operands[c + 1:]
        fork = _fork(flow, rest)
        if fork is None:
            continue
        rank = (any(fork in o.sources for o in rest), fork)
        if key is None or rank > key:
            best, key = (fork, c), rank
    return best


def _inputs(flow: Flow) -> list[int] | None:
    """For each (collapsed) node, the model inputs it is computed from, as bits; None for a model
    with one input (the common case: nothing to compute)."""
    found = flow.memo.get("inputs", False)
    if found is not False:
        return found
    found = None
    if flow.names.count(INPUT) > 1:  # (counted in C: most models have one input)
        leaves = [i for i, name in enumerate(flow.names) if name == INPUT]
        found = [0] * len(flow)
        for k, i in enumerate(leaves):
            found[i] = 1 << k
        for j, preds in enumerate(flow.preds):
            bits = 0
            for p in preds:  # a loop, not a reduce over a generator: this runs over every node
                bits |= found[p]
            if bits:
                found[j] |= bits
    flow.memo["inputs"] = found
    return found


def _union(inputs: list[int], sources: tuple[int, ...]) -> int:
    bits = 0
    for s in sources:
        bits |= inputs[s]
    return bits


def _streams_behind(flow: Flow, sources: tuple[int, ...], fork: int, streams: set[int]) -> set[int]:
    """The latest results of earlier residual sums on the paths from the fork to ``sources``."""
    found: set[int] = set()
    seen: set[int] = set()
    stack = list(sources)
    while stack:
        n = stack.pop()
        if n <= fork or n in seen:
            continue
        seen.add(n)
        if n in streams:
            found.add(n)
        else:
            stack.extend(flow.preds[n])
    return found


def _fork(flow: Flow, operands: tuple[Operand, ...]) -> int | None:
    """Nearest common floating-point ancestor of the operands. Explores backwards in decreasing
    execution order, so a node is expanded only after every explored node that depends on it."""
    every = (1 << len(operands)) - 1
    side: dict[int, int] = {}
    for i, o in enumerate(operands):
        for s in o.sources:
            side[s] = side.get(s, 0) | (1 << i)
    heap = [-s for s in side]
    heapq.heapify(heap)
    while heap:
        n = -heapq.heappop(heap)
        if side[n] == every:
            return n if flow.graph.is_float[n] else None
        for p in flow.preds[n]:
            if p not in side:
                heapq.heappush(heap, -p)
            side[p] = side.get(p, 0) | side[n]
    return None


def _from_stream(flow: Flow, operands: tuple[Operand, ...], fork: int, streams: set[int]) -> list[int]:
    """Each operand's weighted ops on its longest path from the fork or an earlier residual sum's
    result (whichever the path meets last)."""
    region, stack = set(), [s for o in operands for s in o.sources]
    while stack:  # the nodes between the fork and the operands
        n = stack.pop()
        if n in region:
            continue
        region.add(n)
        if n == fork or n in streams:
            continue
        stack.extend(p for p in flow.preds[n] if p >= fork)
    dist: dict[int, int] = {}
    for n in sorted(region):
        if n == fork or n in streams:
            dist[n] = 0
            continue
        best = max((dist[p] for p in flow.preds[n] if p in dist and dist[p] >= 0), default=-1)
        dist[n] = best + flow.weight_count(n) if best >= 0 else -1
    return [max(dist[s] for s in o.sources) + o.extra for o in operands]


def _ends_in_matmul(flow: Flow, node: int, extra: int) -> bool:
    """Is ``node`` a conv or linear layer's result, seen through weight-free ops of one input?"""
    if extra:
        return True  # the product of ``addmm``
    while True:
        if node in flow.norm_name or flow.names[node] in LEAF_KINDS:
            return False
        if flow.weighted[node]:
            return flow.names[node] in MATMUL_OPS
        preds = flow.preds[node]
        if len(preds) != 1:
            return False
        (node,) = preds


def _sum_of_heads(flow: Flow, root: int, operands: tuple[Operand, ...]) -> bool:
    if not all(all(_ends_in_matmul(flow, s, o.extra) for s in o.sources) for o in operands):
        return False
    # Every walk from the sum ends at the model output, with no weighted op, norm or sum on the way.
    stack, seen, reached = [root], set(), root in flow.outputs
    while stack:
        n = stack.pop()
        for s, _ in flow.succ[n]:
            if s in seen:
                continue
            seen.add(s)
            if flow.weighted[s] or s in flow.norm_name or flow.names[s] in SUM_OPS or flow.names[s] == "stack":
                return False
            reached = reached or s in flow.outputs
            stack.append(s)
    return reached
