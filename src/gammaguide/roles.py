"""Give every normalization scale a role from the traced dataflow.

Each normalization module call becomes one node. From each use of a γ we walk forward
through the ops; a walk stops at another normalization, at a residual addition, or at
the model output:

- ``residual_last``: some walk reaches a residual addition on the branch side
  with no other normalization in between (the paper's γ_last);
- ``scale_invariant``: every walk meets another normalization first (γ_others);
- ``shortcut``: the norm lies inside the skip path of a residual addition, or some walk
  reaches the skip side through at least one conv/linear (γ_down);
- ``stream``: some walk reaches the skip side with no conv/linear in between: the
  norm's output is the residual stream (γ_first);
- ``head``: some walk reaches the model output with no normalization or residual
  addition in between;
- ``unused``: the γ was not reached by the traced forward pass.

When walks disagree the role that protects the skip path wins (``ROLE_PRIORITY``).

A residual addition is an add whose two tensor inputs share a floating-point
ancestor in the traced graph; the nearest one (the latest in execution order) is the
*fork*. The skip side is the input with strictly fewer weighted ops (conv, linear,
embedding, normalization) on its longest path from the fork. Equal counts (``x + x``,
``q*cos + rotate(q)*sin``, ``x + c*x**3`` inside GELU) are not residual additions, and
neither is adding a parameter (a positional embedding) or a constant.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

from .norms import NormFinding, activations, root_params
from .ops import ADD_OPS, MATMUL_OPS, SHAPE_ONLY_OPS
from .trace import LEAF_KINDS, PARAM, Graph

ROLES = ("residual_last", "scale_invariant", "shortcut", "stream", "head", "unused")
# Strongest first: the role that protects the skip path wins when walks disagree.
ROLE_PRIORITY = ("stream", "shortcut", "residual_last", "head", "scale_invariant", "unused")
PAPER_CATEGORY = {
    "residual_last": "last",
    "scale_invariant": "others",
    "shortcut": "down",
    "stream": "first",
    "head": None,
    "unused": None,
}


@dataclass(frozen=True)
class ResidualAdd:
    """A residual addition found in the trace."""

    node: int  # index of the add op in the trace
    module_name: str  # the module whose forward ran the add
    skip_arg: int  # which tensor argument (0 or 1) is the skip side
    branch_weighted: int  # weighted ops on the branch side since the fork
    skip_weighted: int


class Dataflow:
    """The traced graph with each normalization call collapsed into one node."""

    def __init__(self, graph: Graph, finding: NormFinding):
        self.graph = graph
        n = len(graph)
        names = self.names = graph.op_names()
        self.root = root_params(graph)
        rep = list(range(n))
        self.norm_name: dict[int, str] = {}
        for c in finding.norm_calls:
            call = graph.calls[c]
            inner = [i for i in range(call.start, call.end) if names[i] not in LEAF_KINDS]
            if not inner:
                continue
            s = inner[-1]
            for i in inner:
                rep[i] = s
            self.norm_name[s] = call.name or type(call.module).__name__
        for i in finding.functional:
            self.norm_name[i] = self._context(i)
        self.rep = rep

        self.act = act = activations(graph)

        preds: list[set[int]] = [set() for _ in range(n)]
        succ: list[dict[tuple[int, int], None]] = [{} for _ in range(n)]  # ordered set of (node, arg position)
        for i in range(n):
            if names[i] in LEAF_KINDS or names[i] in SHAPE_ONLY_OPS:
                continue
            j = rep[i]
            for pos, k in enumerate(graph.ins[i]):
                s = rep[k]
                if s == j:
                    continue
                if act[s]:
                    preds[j].add(s)
                succ[s][(j, pos if j == i else -1)] = None
        self.preds = preds
        self.succ = succ  # iterating an ordered set (a dict) gives its (node, position) pairs
        # A conv/linear/matmul is weighted when an operand is computed from parameters alone
        # (the weight itself, a view or cast of it, or a standardized weight as in StdConv2d).
        from_param = [False] * n
        for i in range(n):
            if names[i] == PARAM:
                from_param[i] = True
            elif names[i] not in LEAF_KINDS and not act[i]:
                from_param[i] = any(from_param[k] for k in graph.ins[i])
        self.weighted = [
            names[i] in MATMUL_OPS and any(from_param[k] for k in graph.ins[i]) for i in range(n)
        ]
        self.outputs = {rep[o] for o in graph.outputs}
        self._residual: dict[int, tuple[int, int, int, int] | None] = {}
        self._ancestor: dict[tuple[int, int], bool] = {}

    # -- names ------------------------------------------------------------------------------------
    def _context(self, i: int) -> str:
        """The innermost named module whose forward ran node ``i``."""
        c = self.graph.call[i]
        while c >= 0:
            call = self.graph.calls[c]
            if call.name is not None:
                return call.name or "<model>"
            c = call.parent
        return "<model>"

    def name(self, j: int) -> str:
        return self.norm_name.get(j) or self._context(j)

    def weight_count(self, j: int) -> int:
        return 1 if (self.weighted[j] or j in self.norm_name) else 0

    # -- residual additions -----------------------------------------------------------------------
    def residual(self, j: int) -> tuple[int, int, int, int] | None:
        """(skip arg position, fork node, branch count, skip count) if node ``j`` is a residual add."""
        if j in self._residual:
            return self._residual[j]
        result = None
        ins = self.graph.ins[j]
        if (
            self.rep[j] == j
            and j not in self.norm_name
            and self.names[j] in ADD_OPS
            and len(ins) == 2
            and self.act[self.rep[ins[0]]]
            and self.act[self.rep[ins[1]]]
        ):
            a, b = self.rep[ins[0]], self.rep[ins[1]]
            fork = self._fork(a, b) if a != b else None
            if fork is not None:
                c, da, db = fork
                if da != db:
                    skip = 0 if da < db else 1
                    result = (skip, c, max(da, db), min(da, db))
        self._residual[j] = result
        return result

    def _fork(self, a: int, b: int) -> tuple[int, int, int] | None:
        """Nearest common floating-point ancestor of ``a`` and ``b`` and the longest weighted
        paths from it to each. Explores backwards in decreasing execution order, so a node is
        expanded only after every explored node that depends on it."""
        side = {a: 1, b: 2}
        dist = {a: [0, -1], b: [-1, 0]}
        heap = sorted((-a, -b))  # a sorted list is a valid heap
        queued = {a, b}
        while heap:
            n = -heapq.heappop(heap)
            if side[n] == 3:
                if not self.graph.is_float[n]:
                    return None
                return n, dist[n][0], dist[n][1]
            w = self.weight_count(n)
            for p in self.preds[n]:
                side[p] = side.get(p, 0) | side[n]
                dp = dist.setdefault(p, [-1, -1])
                for s in (0, 1):
                    if dist[n][s] >= 0:
                        dp[s] = max(dp[s], dist[n][s] + w)
                if p not in queued:
                    queued.add(p)
                    heapq.heappush(heap, -p)
        return None

    def is_ancestor(self, c: int, u: int) -> bool:
        """Is ``c`` an ancestor of ``u``? (searching only nodes executed after ``c``)."""
        key = (c, u)
        if key not in self._ancestor:
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
        return self._ancestor[key]

    def residual_adds(self) -> list[ResidualAdd]:
        out = []
        for j, name in enumerate(self.names):
            if name not in ADD_OPS:
                continue
            r = self.residual(j)
            if r is not None:
                out.append(ResidualAdd(j, self._context(j), r[0], r[2], r[3]))
        return out

    # -- walks ------------------------------------------------------------------------------------
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

    def events(self, u: int) -> list[tuple[str, int, int]]:
        """Where the walks forward from node ``u`` end: (role, node, via) triples, where node is
        the normalization, residual add or output reached and ``via`` the first weighted op on
        the way (-1 if none)."""
        # A norm whose own output is returned (``nn.Sequential(..., nn.LayerNorm(d))``) has no
        # successor to reach the output through.
        out: list[tuple[str, int, int]] = [("head", u, -1)] if u in self.outputs else []
        names, norm_name, succ = self.names, self.norm_name, self.succ
        seen: set[tuple[int, int, bool]] = set()
        stack = [(s, pos, -1) for s, pos in succ[u]]
        while stack:
            n, pos, via = stack.pop()
            is_add = names[n] in ADD_OPS
            # The argument position matters only at an add (which side it is reached on):
            # elsewhere one visit per node (and per "through a weighted op or not") is enough.
            state = (n, pos if is_add else -1, via >= 0)
            if state in seen:
                continue
            seen.add(state)
            if n in norm_name:
                out.append(("scale_invariant", n, via))
                continue
            r = self.residual(n) if is_add else None
            if r is not None:
                skip, fork = r[0], r[1]
                if pos != skip:
                    out.append(("residual_last", n, via))
                elif (fork != u and self.is_ancestor(fork, u)) or via >= 0:
                    out.append(("shortcut", n, via))
                else:
                    out.append(("stream", n, via))
                continue
            if via < 0 and self.weighted[n]:
                via = n
            if n in self.outputs:
                out.append(("head", n, via))
            stack.extend((s, p, via) for s, p in succ[n])
        return out

    def walk(self, u: int) -> dict[str, str]:
        """Outcomes of every walk forward from node ``u``: role -> evidence for it."""
        found: dict[str, str] = {}
        met_norms: list[str] = []
        events = self.events(u)
        for role, n, via in events:
            where = self._context(n)
            if role == "scale_invariant":
                if len(met_norms) < 2 and self.norm_name[n] not in met_norms:
                    met_norms.append(self.norm_name[n])
            elif role == "residual_last":
                found.setdefault(role, f"reaches the residual add in {where} on the branch side")
            elif role == "shortcut" and via < 0:
                found.setdefault(role, f"lies inside the skip path of the residual add in {where}")
            elif role == "shortcut":
                found.setdefault(role, f"reaches the skip side of the residual add in {where} through "
                                       f"{self._context(via)}")
            elif role == "stream":
                found.setdefault(role, f"its output is the skip (identity) input of the residual add in {where}")
            elif role == "head":
                through = f" through {self._context(via)}" if via >= 0 else ""
                found.setdefault(role, f"reaches the model output{through} with no normalization in between")
        if met_norms:
            every = "every" if not found else "some"
            found["scale_invariant"] = f"{every} path meets another normalization first ({', '.join(met_norms)})"
        return found


def strongest(outcomes: dict[str, str]) -> tuple[str, str]:
    """The winning role and its evidence; ``unused`` when no walk ended anywhere."""
    for role in ROLE_PRIORITY:
        if role in outcomes:
            return role, outcomes[role]
    return "unused", "its output reaches no normalization, residual addition or model output"
