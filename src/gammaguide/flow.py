"""The traced graph as the role analysis reads it: each normalization call is one node.

``collapse`` turns the op-level graph of ``trace.py`` into what later stages walk: every
normalization module call becomes a single node (its last op), edges between such nodes keep the
position of the argument they feed (for ops that are not collapsed), and each op is marked
*weighted* when it multiplies an activation by a parameter (conv, linear, embedding). Nothing here
knows about sums or roles; ``sums.py`` and ``walks.py`` build on it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .norms import NO_DATAFLOW, NormFinding, activations, root_params
from .ops import MATMUL_OPS
from .trace import LEAF_KINDS, PARAM, Graph


@dataclass
class Flow:
    """The collapsed dataflow. Node ids are those of the traced graph; a collapsed normalization
    call is represented by its last op (``rep`` maps every op of the call to it)."""

    graph: Graph
    names: list[str]  # each node's op base name
    rep: list[int]
    norm_name: dict[int, str]  # normalization node -> the module (or context) name
    norm_call: dict[int, int]  # normalization node -> its module call (absent for functional norms)
    act: list[bool]  # computed from a model input
    preds: list[set[int]]  # activation predecessors, collapsed
    succ: list[dict[tuple[int, int], None]]  # ordered set of (successor, argument position or -1)
    weighted: list[bool]
    outputs: set[int]
    root: list[str | None]  # the parameter a node is a view or cast of
    _ancestor: dict[tuple[int, int], bool] = field(default_factory=dict, repr=False)
    memo: dict = field(default_factory=dict, repr=False)  # per-node facts channels.py derives once

    def __len__(self) -> int:
        return len(self.names)

    def context(self, i: int) -> str:
        return context(self.graph, i)

    def name(self, j: int) -> str:
        return self.norm_name.get(j) or self.context(j)

    def weight_count(self, j: int) -> int:
        """1 for a weighted op or a normalization: what makes a path longer than an identity."""
        return 1 if (self.weighted[j] or j in self.norm_name) else 0

    def is_ancestor(self, c: int, u: int) -> bool:
        """Is ``c`` an ancestor of ``u``? (searching only nodes executed after ``c``)."""
        key = (c, u)
        found = self._ancestor.get(key)
        if found is None:
            found, stack, seen = False, [u], {u}
            while stack and not found:
                n = stack.pop()
                for p in self.preds[n]:
                    if p == c:
                        found = True
                        break
                    if p > c and p not in seen:
                        seen.add(p)
                        stack.append(p)
            self._ancestor[key] = found
        return found

    def uses(self) -> dict[str, set[int]]:
        """Parameter name -> the (collapsed) nodes that consume it, seen through views and casts."""
        uses: dict[str, set[int]] = {}
        root, rep, ins = self.root, self.rep, self.graph.ins
        for i, name in enumerate(self.names):
            if name in LEAF_KINDS:
                continue
            for k in ins[i]:
                p = root[k]
                if p is not None and root[i] != p:
                    uses.setdefault(p, set()).add(rep[i])
        return uses


def context(graph: Graph, i: int) -> str:
    """The innermost named module whose forward ran node ``i``."""
    c = graph.call[i]
    while c >= 0:
        call = graph.calls[c]
        if call.name is not None:
            return call.name or "<model>"
        c = call.parent
    return "<model>"


def collapse(graph: Graph, finding: NormFinding) -> Flow:
    n = len(graph)
    names = graph.op_names()
    rep = list(range(n))
    norm_name: dict[int, str] = {}
    norm_call: dict[int, int] = {}
    for c in finding.norm_calls:
        call = graph.calls[c]
        inner = [i for i in range(call.start, call.end) if names[i] not in LEAF_KINDS]
        if not inner:
            continue
        s = inner[-1]
        for i in inner:
            rep[i] = s
        norm_name[s] = call.name or type(call.module).__name__
        norm_call[s] = c
    for i in finding.functional:
        norm_name[i] = context(graph, i)

    act = activations(graph)
    ins = graph.ins
    preds: list[set[int]] = [set() for _ in range(n)]
    succ: list[dict[tuple[int, int], None]] = [{} for _ in range(n)]
    for i, name in enumerate(names):
        if name in NO_DATAFLOW:
            continue
        j = rep[i]
        for pos, k in enumerate(ins[i]):
            s = rep[k]
            if s == j:
                continue
            if act[s]:
                preds[j].add(s)
            succ[s][(j, pos if j == i else -1)] = None
    # A conv/linear/matmul is weighted when an operand is computed from parameters alone
    # (the weight itself, a view or cast of it, or a standardized weight as in StdConv2d).
    # (Plain loops rather than any() over generators: this runs over every node of every analysis.)
    from_param = [False] * n
    weighted = [False] * n
    for i, name in enumerate(names):
        if name == PARAM:
            from_param[i] = True
        elif name in MATMUL_OPS or (name not in LEAF_KINDS and not act[i]):
            for k in ins[i]:
                if from_param[k]:
                    if not act[i]:
                        from_param[i] = True
                    weighted[i] = name in MATMUL_OPS
                    break
    outputs = {rep[o] for o in graph.outputs}
    return Flow(graph, names, rep, norm_name, norm_call, act, preds, succ, weighted, outputs, root_params(graph))
