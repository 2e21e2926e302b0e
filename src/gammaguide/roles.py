"""Give every normalization scale a role from the traced dataflow.

The steps, in the order a reader follows them:

1. ``flow.py``: the traced graph with each normalization call collapsed into one node;
2. ``sums.py``: the sums (chains of additions), their operands, and which operand is the skip;
3. ``channels.py``: which elements of each tensor carry a γ, through concatenations, slices,
   splits, shuffles, convolutions and sums;
4. ``walks.py``: walks forward from each use of a γ, ending at normalizations, residual sums and
   the model output;
5. here: the role of a γ from where its walks end.

- ``residual_last``: some walk reaches a branch of a residual sum with no other normalization in
  between (the paper's γ_last);
- ``scale_invariant``: every walk meets another normalization that cancels the γ's scale (γ_others);
- ``merged``: some walk meets a normalization only after the γ's output was mixed with other
  features (concatenated with them and mixed by a conv or linear layer, shuffled into their groups,
  summed with them with no skip): the network is not invariant to this γ, and no category of the
  paper fits it;
- ``shortcut``: the norm lies inside the skip path of a residual sum, or some walk reaches the skip
  through at least one conv/linear (γ_down);
- ``stream``: some walk reaches the skip with no conv/linear in between: the norm's output is the
  residual stream (γ_first);
- ``head``: some walk reaches the model output with no normalization or residual sum in between;
- ``unused``: the γ was not reached by the traced forward pass.

When walks disagree the role that protects the skip path wins (``ROLE_PRIORITY``).
"""

from __future__ import annotations

from dataclasses import dataclass

from .flow import Flow, collapse
from .norms import NormFinding
from .sums import Sums
from .trace import Graph
from .walks import Event, reachable, walk

ROLES = ("residual_last", "scale_invariant", "merged", "shortcut", "stream", "head", "unused")
# Strongest first: the role that protects the skip path wins when walks disagree; a γ some walk
# shows not to be scale-invariant is not called so.
ROLE_PRIORITY = ("stream", "shortcut", "residual_last", "head", "merged", "scale_invariant", "unused")
PAPER_CATEGORY = {
    "residual_last": "last",
    "scale_invariant": "others",
    "merged": None,
    "shortcut": "down",
    "stream": "first",
    "head": None,
    "unused": None,
}


@dataclass(frozen=True)
class ResidualAdd:
    """A residual sum found in the trace."""

    node: int  # index of its last op in the trace
    module_name: str  # the module whose forward ran it
    skip_arg: int  # which tensor argument of that op carries the skip (the skip itself, or the chain holding it)
    branch_weighted: int  # weighted ops since the fork on the longest branch
    skip_weighted: int
    branches: int = 1  # how many branches the sum adds to the skip
    # (op, argument position) of the skip and of each branch, as in ``Graph.add_observations``.
    skip_operand: tuple[int, int] = (-1, -1)
    branch_operands: tuple[tuple[int, int], ...] = ()


class Dataflow:
    """The traced graph, its sums, and the walks from its normalizations."""

    def __init__(self, graph: Graph, finding: NormFinding):
        self.graph = graph
        self.flow: Flow = collapse(graph, finding)
        self.sums = Sums(self.flow)
        self._reachable: list[int] | None = None

    def uses(self) -> dict[str, set[int]]:
        """Parameter name -> the (collapsed) nodes that consume it, seen through views and casts."""
        return self.flow.uses()

    def name(self, u: int) -> str:
        """The normalization (module or context) that node ``u`` belongs to."""
        return self.flow.name(u)

    def events(self, u: int) -> list[Event]:
        """Where every walk from node ``u`` ends."""
        return walk(self.flow, self.sums, u)

    def walk(self, u: int) -> dict[str, str]:
        """Outcomes of the walks forward from node ``u`` that decide its role: role -> evidence."""
        if self._reachable is None:
            self._reachable = reachable(self.flow, self.sums)
        return evidence(self.flow, walk(self.flow, self.sums, u, self._reachable))

    def residual_adds(self) -> list[ResidualAdd]:
        flow, out = self.flow, []
        for s in self.sums.residual():
            skip = s.operands[s.skip]
            branches = s.branches
            out.append(ResidualAdd(
                s.node, flow.context(s.node), _final_arg(flow, s, skip), max(b.weighted for b in branches),
                skip.weighted, len(branches), (skip.node, skip.pos), tuple((b.node, b.pos) for b in branches),
            ))
        return out


def _final_arg(flow: Flow, s, operand) -> int:
    """The argument of the sum's last op through which ``operand`` enters it."""
    node = operand.node
    if node == s.node:
        return operand.pos
    members = set(s.members)
    while True:
        (consumer, pos), = flow.succ[node]  # a chain member feeds exactly one op
        if consumer == s.node:
            return pos
        if consumer not in members:
            return 0
        node = consumer


def evidence(flow: Flow, events: list[Event]) -> dict[str, str]:
    """Role -> one line of evidence, for every role some walk ended in."""
    found: dict[str, str] = {}
    met: dict[str, list[str]] = {"scale_invariant": [], "merged": []}
    for e in events:
        where = flow.context(e.node)
        if e.role in met:
            names = met[e.role]
            if len(names) < 2 and flow.norm_name[e.node] not in names:
                names.append(flow.norm_name[e.node])
        elif e.role == "residual_last":
            found.setdefault(e.role, f"reaches the residual add in {where} on the branch side")
        elif e.role == "shortcut" and e.via < 0:
            found.setdefault(e.role, f"lies inside the skip path of the residual add in {where}")
        elif e.role == "shortcut":
            found.setdefault(e.role, f"reaches the skip side of the residual add in {where} through "
                                     f"{flow.context(e.via)}")
        elif e.role == "stream":
            found.setdefault(e.role, f"its output is the skip (identity) input of the residual add in {where}")
        elif e.role == "head":
            through = f" through {flow.context(e.via)}" if e.via >= 0 else ""
            found.setdefault(e.role, f"reaches the model output{through} with no normalization in between")
    if met["merged"]:
        found["merged"] = (f"its output is mixed with other features before {', '.join(met['merged'])} normalizes "
                           f"it, so the network is not invariant to its scale")
    if met["scale_invariant"]:
        # Shown only when it is the role (``strongest``), that is when no walk ended anywhere else.
        found["scale_invariant"] = f"every path meets another normalization first ({', '.join(met['scale_invariant'])})"
    return found


def strongest(outcomes: dict[str, str]) -> tuple[str, str]:
    """The winning role and its evidence; ``unused`` when no walk ended anywhere."""
    for role in ROLE_PRIORITY:
        if role in outcomes:
            return role, outcomes[role]
    return "unused", "its output reaches no normalization, residual addition or model output"
