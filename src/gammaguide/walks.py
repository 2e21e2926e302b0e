"""Walks forward from a normalization's output: where its γ ends up.

The walk follows the elements the γ scales (channels.py) from the norm's output, op by op in
execution order, so that every path into an op is merged before the op is looked at. It stops at:

- another normalization: ``scale_invariant`` when that norm cancels the γ's scale (each of its
  groups holds only scaled or only unscaled elements), ``merged`` when the γ's elements were mixed
  with other features before it (concatenated then mixed by a conv, shuffled, summed with no
  skip) or share a group with unscaled ones;
- an operand of a residual sum (sums.py): ``residual_last`` for a branch, ``stream`` for the skip
  when no conv/linear lies on the way, else ``shortcut`` (also when the norm itself lies inside
  the skip path, after the sum's fork). A walk that reaches every operand of a sum, each through a
  conv/linear, scales the whole sum, skip and branches alike: it goes on through the sum (the
  γ feeds a projection that the sum is built from, as in FocalNet's modulation branch);
- the model output: ``head``.

A walk that leaves every element of a path (a slice that keeps none of the γ's channels) ends
there without an event.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

from .channels import NOTHING, START, Reach, additive, invariant_at, reach_union, transfer
from .flow import Flow
from .sums import Sums


@dataclass(frozen=True)
class Event:
    """Where one walk ended."""

    role: str
    node: int  # the normalization, the residual sum's last op, or the output reached
    via: int  # the first weighted op on the way; -1 if none
    operand: int = -1  # for a residual sum: which of its operands
    reach: Reach = START  # which elements of the γ's output arrived there, scaled or mixed (sums, output)


# Events by strength (roles.ROLE_PRIORITY): a walk may stop once no pending op can lead to a
# stronger event than the strongest found.
_RANK = {"stream": 0, "shortcut": 1, "residual_last": 2, "head": 3, "merged": 4, "scale_invariant": 5}


def walk(flow: Flow, sums: Sums, u: int, ahead: list[int] | None = None) -> list[Event]:
    """Every end of the walks from node ``u`` (a normalization's output). With ``ahead`` (from
    ``reachable``): only as many as decide the role (the strongest is among them; see ``_RANK``)."""
    events: list[Event] = []
    if u in flow.outputs:  # a norm whose own output is returned has no successor to reach it through
        events.append(Event("head", u, -1))
    succ, norm_name, outputs, weighted, member_of = flow.succ, flow.norm_name, flow.outputs, flow.weighted, sums.member
    # Work items are keyed 3 * node + kind, kind 0 (reached with no weighted op on the way), 1 (through
    # one) or _SUM (a residual sum's last op, looked at once every op of its chain has run): the
    # heap gives them in execution order. pending: key -> {(argument position, source): what arrives}.
    pending: dict[int, dict[tuple[int, int], Reach]] = {}
    via_of: dict[int, int] = {}
    heap: list[int] = []
    opened = [0, 0]  # pending ops from which a residual sum, the output, can still be reached

    def send(n: int, kind: int, via: int, reach: Reach) -> None:
        for s, pos in succ[n]:
            key = 3 * s + kind
            slot = pending.get(key)
            if slot is None:
                slot = pending[key] = {}
                heapq.heappush(heap, key)
                if kind:
                    via_of.setdefault(s, via)
                if ahead is not None:
                    opened[0] += ahead[s] >> 1
                    opened[1] += ahead[s] & 1
            old = slot.get((pos, n))
            slot[(pos, n)] = reach if old is None else reach_union(old, reach)

    at_sums: dict[int, list[tuple[int, int, Reach]]] = {}  # a sum's last op -> (operand, via, reach)
    send(u, 0, -1, START)
    best, counted = 6, 0
    while heap:
        if ahead is not None:
            if counted < len(events):
                best = min([best] + [_RANK[e.role] for e in events[counted:]])
                counted = len(events)
            if best <= 4 and _decided(best, opened[0] + len(at_sums), opened[1]):
                break
        n, kind = divmod(heapq.heappop(heap), 3)
        if kind == _SUM:
            events.extend(_at_sum(flow, sums, u, n, at_sums.pop(n), send))
            continue
        arrived = pending.pop(3 * n + kind)
        if ahead is not None:
            opened[0] -= ahead[n] >> 1
            opened[1] -= ahead[n] & 1
        via = via_of.get(n, -1) if kind else -1
        if n in norm_name:
            events.append(_at_norm(flow, n, via, arrived))
            continue
        member = member_of(n)
        if member is not None:
            if member.node not in at_sums:
                at_sums[member.node] = []
                heapq.heappush(heap, 3 * member.node + _SUM)
            for (pos, _), reach in arrived.items():
                found = sums.operand_at(n, pos)
                if found is not None:
                    at_sums[member.node].append((found[1], via, reach))
            continue
        if len(arrived) == 1:
            ((pos, _), reach), = arrived.items()
            by_pos = {pos: reach}
        else:
            by_pos = {}
            for (pos, _), reach in arrived.items():
                by_pos[pos] = reach_union(by_pos[pos], reach) if pos in by_pos else reach
        out = transfer(flow, n, by_pos)
        if out == NOTHING:
            continue
        if not kind and weighted[n]:
            kind, via = 1, n
        if n in outputs:
            events.append(Event("head", n, via, reach=out))
        send(n, kind, via, out)
    return events


def _decided(best: int, open_sums: int, open_ends: int) -> bool:
    """Can no pending op lead to an event stronger than ``best``? Stronger than shortcut,
    residual_last or head is only a residual sum's; stronger than merged, also the output's."""
    if best == 0:
        return True
    if best <= 3:
        return not open_sums
    return best == 4 and not open_sums and not open_ends


def reachable(flow: Flow, sums: Sums) -> list[int]:
    """For each op: 2 if a walk from it can reach an op of a residual sum, plus 1 if it can reach
    the model output, without passing another normalization."""
    found = [0] * len(flow)
    for n in range(len(flow) - 1, -1, -1):
        bits = (2 if sums.member(n) is not None else 0) | (1 if n in flow.outputs else 0)
        for s, _ in flow.succ[n]:
            if s not in flow.norm_name:
                bits |= found[s]
        found[n] = bits
    return found


def _at_norm(flow: Flow, n: int, via: int, arrived: dict[tuple[int, int], Reach]) -> Event:
    # (No reach on the event: only a residual sum operand's is read, by verify.)
    invariant = all(reach[1] is None and invariant_at(flow, n, source, reach[0])
                    for (_, source), reach in arrived.items())
    return Event("scale_invariant" if invariant else "merged", n, via)


def _at_sum(flow: Flow, sums: Sums, u: int, n: int, arrived: list[tuple[int, int, Reach]], send) -> list[Event]:
    s = sums.member(n)
    reached = {index for index, via, _ in arrived if via >= 0}
    if len(reached) == len(s.operands) and all(via >= 0 for _, via, _ in arrived):
        out = additive([reach for _, _, reach in arrived])
        via = min(via for _, via, _ in arrived)
        events = [Event("head", n, via, reach=out)] if n in flow.outputs else []
        send(n, 1, via, out)
        return events
    out = []
    for index, via, reach in arrived:
        if index != s.skip:
            role = "residual_last"
        elif (s.fork != u and flow.is_ancestor(s.fork, u)) or via >= 0:
            role = "shortcut"
        else:
            role = "stream"
        out.append(Event(role, s.node, via, index, reach))
    return out


_SUM = 2  # the kind of a residual sum's last op in the heap: after its own arrivals (kinds 0, 1)
