"""The paper's claims, each checked in every setting: a verdict from a paired t interval.

A claim compares two arms of one setting seed by seed. It is **confirmed** where the 95% interval
of the paired difference excludes 0 in the paper's direction, **contradicted** where it excludes 0
in the other direction, and **not shown** otherwise (whatever the sign of the mean, and always
with fewer than 2 paired seeds). A setting without one of the two arms says "no run", unless
another arm of the setting decays exactly the same parameters (the same policy there: a pre-LN
transformer's ``guidelines`` is its ``only:residual_last``); that arm stands in, and the cell says
so. Two arms that decay the same parameters in a setting (no shortcut γ: ``only:shortcut`` is
``no_gamma``) make the cell "same policy", not a verdict.

Six claims are tested per setting, so each cell also gives Holm's verdict: the paired t tests' p
values adjusted over the setting's claims (family-wise 5%). And where a claim of the paper comes
with a size (at least 1 accuracy point, in its direction), a cell whose interval lies wholly on
the near side of that size says "smaller than the paper's".

Claims map to arms the way the role table of docs/core.md maps the paper's categories to roles:
γ_last -> ``residual_last``, γ_others -> ``scale_invariant``, γ_down -> ``shortcut``,
γ_first -> ``stream``; "L2 on γ_X" is the arm that decays that role's γ alone, against decaying none.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from typing import Any

from ..policy import resolve_policy
from .stats import CONFIRMED, CONTRADICTED, NOT_SHOWN, Difference, holm, verdict
from .summary import ALL, BASELINE, NO_NORM, Experiment


@dataclass(frozen=True)
class Claim:
    text: str  # the paper's claim, in a few words
    category: str  # the paper's γ category, or "" for the claims about whole policies
    role: str  # gammaguide's role for that category
    arm: str
    reference: str
    direction: int  # +1: the paper says arm > reference; -1: arm < reference; 0: the control (equal)
    paper: str  # what the paper reports about the size
    smallest: float | None = None  # the paper's smallest effect, in accuracy (fraction): 0.01 = 1 point


CLAIMS = (
    Claim("L2 on γ_last raises the metric", "γ_last", "residual_last", "only:residual_last", BASELINE, 1,
          "+1 to +4 points", 0.01),
    Claim("L2 on γ_others raises the metric", "γ_others", "scale_invariant", "only:scale_invariant", BASELINE, 1,
          "+1 to +4 points", 0.01),
    Claim("L2 on γ_down lowers the metric", "γ_down", "shortcut", "only:shortcut", BASELINE, -1, "-1 to -3 points",
          0.01),
    Claim("L2 on γ_first lowers the metric", "γ_first", "stream", "only:stream", BASELINE, -1, "-1 to -3 points",
          0.01),
    Claim("the guidelines beat decaying every γ", "", "", "guidelines", ALL, 1, "higher"),
    Claim("the guidelines beat decaying no γ", "", "", "guidelines", BASELINE, 1, "higher"),
)
# no_norm and no_gamma are one policy (no γ, β or bias decayed): their difference is the noise of
# two runs of identical settings, which every claim's difference has to stand out from.
NOISE = Claim("control: identical settings (noise)", "", "", NO_NORM, BASELINE, 0, "0 (the same policy)")

NO_RUN = "no run"
SAME_POLICY = "same policy"
NOISE_SHOWN, NOISE_NOT_SHOWN = "differs from 0", "no difference shown"
SMALLER = "smaller than the paper's"


@dataclass(frozen=True)
class Cell:
    """One claim in one setting."""

    claim: Claim
    difference: Difference | None  # None: one of the two arms has no run in the setting
    verdict: str  # confirmed / contradicted / not shown / no run / same policy (the control: differs from 0 / ...)
    holm: str | None = None  # the verdict after Holm's adjustment over the setting's claims
    smaller: bool = False  # the interval excludes the paper's smallest effect in the paper's direction
    stand_in: str | None = None  # the arm used for ``claim.arm``, which has no run but the same policy


def _signature(exp: Experiment, arm: str) -> tuple[Any, ...] | None:
    """What ``arm`` decays in this setting: γ decayed per role (from its runs' records) and the
    policy's other kinds; None without a record that says."""
    roles = next((r.get("roles") for r in exp.runs if r.get("arm") == arm and r.get("roles")), None)
    if roles is None:
        return None
    # Every run record's roles carry both (results.RunRecord).
    return _policy_signature(arm, {role: v["count"] for role, v in roles.items()},
                             {role: v["decayed"] for role, v in roles.items()})


def _policy_signature(arm: str, counts: dict[str, int], decayed: dict[str, int]) -> tuple[Any, ...]:
    p = resolve_policy(arm)
    return (tuple(sorted((r, d) for r, d in decayed.items() if counts.get(r))), p.weight, p.beta, p.bias, p.other)


def _expected_signature(exp: Experiment, arm: str) -> tuple[Any, ...] | None:
    """What ``arm`` would decay in this setting, from the role counts any run of it recorded."""
    counts = next((r.get("roles") for r in exp.runs if r.get("roles")), None)
    if counts is None:
        return None
    policy = resolve_policy(arm)
    count = {role: v["count"] for role, v in counts.items()}
    return _policy_signature(arm, count, {role: n if policy.decides("gamma", role) else 0 for role, n in count.items()})


def _stand_in(exp: Experiment, arm: str) -> str | None:
    """An arm with runs in this setting that decays exactly what the missing ``arm`` would."""
    want = _expected_signature(exp, arm)
    if want is None:
        return None
    return next((a.arm for a in exp.arms if a.values and _signature(exp, a.arm) == want), None)


def check(exp: Experiment, claim: Claim) -> Cell:
    """One claim in one setting, without the multiplicity adjustment (``check_setting`` adds it)."""
    arm, stand_in = claim.arm, None
    if exp.arm(arm) is None and claim.direction != 0:
        stand_in = _stand_in(exp, arm)
        arm = stand_in or arm
    diff = exp.difference(arm, claim.reference)
    if diff is None:
        return Cell(claim, None, NO_RUN)
    if claim.direction == 0:
        return Cell(claim, diff, NOISE_SHOWN if diff.excludes_zero else NOISE_NOT_SHOWN)
    mine, theirs = _signature(exp, arm), _signature(exp, claim.reference)
    if mine is not None and mine == theirs:
        return Cell(claim, diff, SAME_POLICY, stand_in=stand_in)
    said = verdict(diff, claim.direction)
    # A contradiction already says more than "smaller": the interval lies on the other side of 0.
    smaller = bool(claim.smallest and exp.metric.key == "test_acc" and diff.has_interval and said != CONTRADICTED
                   and (diff.high < claim.smallest if claim.direction > 0 else diff.low > -claim.smallest))
    return Cell(claim, diff, said, smaller=smaller, stand_in=stand_in)


def check_setting(exp: Experiment) -> list[Cell]:
    """Every claim in one setting (the control last), with Holm's verdict over the claims that have a
    paired t test (same-policy and missing cells are not tests)."""
    cells = [check(exp, c) for c in CLAIMS]
    tested = {i: c.difference.p for i, c in enumerate(cells)
              if c.verdict in (CONFIRMED, CONTRADICTED, NOT_SHOWN) and c.difference and c.difference.p is not None}
    rejected = holm({str(i): p for i, p in tested.items()})
    out = [replace(c, holm=(c.verdict if str(i) in rejected else NOT_SHOWN) if i in tested else None)
           for i, c in enumerate(cells)]
    return out + [check(exp, NOISE)]


# ----------------------------------------------------------------------------- markdown


def format_difference(diff: Difference | None, scale: float) -> str:
    """'+0.63 [-2.08, +3.34], n=2' in the metric's unit; says so where there is nothing to compute."""
    if diff is None:
        return NO_RUN
    if diff.n == 0:
        return "no paired seed"
    if not diff.has_interval:
        return f"{scale * diff.mean:+.2f}, n={diff.n}: no interval (n < 2)"
    return f"{scale * diff.mean:+.2f} [{scale * diff.low:+.2f}, {scale * diff.high:+.2f}], n={diff.n}"


def _bold(verdict: str) -> str:
    return f"**{verdict}**" if verdict in (CONFIRMED, CONTRADICTED, NOISE_SHOWN) else verdict


def _cell_text(cell: Cell, exp: Experiment) -> str:
    if cell.difference is None:
        return NO_RUN
    if cell.verdict == SAME_POLICY:
        return f"{SAME_POLICY} (`{cell.claim.arm}` decays what `{cell.claim.reference}` decays here)"
    arm = cell.stand_in or cell.claim.arm
    failed = sum(a.failed for a in exp.arms if a.arm in (arm, cell.claim.reference))
    extra = f" ({failed} failed run{'s' * (failed > 1)})" if failed else ""
    text = f"{format_difference(cell.difference, exp.metric.scale)}{extra}: {_bold(cell.verdict)}"
    if cell.holm is not None:
        text += f"; Holm: {_bold(cell.holm)}"
    if cell.smaller:
        text += f"; *{SMALLER}*"
    if cell.stand_in:
        text += f" (`{cell.stand_in}` runs, the same policy here)"
    return text


def decay_time(exp: Experiment) -> float | None:
    """D = sum of lr_t x weight decay over the whole schedule, as the runs recorded it (the same for
    every run of a setting); None for records made before runs recorded it."""
    for r in exp.runs:
        history = r.get("history") or []
        if r.get("status") == "ok" and history and isinstance(history[-1].get("decay_time"), (int, float)):
            return float(history[-1]["decay_time"])
    return None


def mapping_table() -> str:
    rows = ["| claim | paper's category → gammaguide role | difference (paired by seed) | the paper |",
            "|---|---|---|---|"]
    for c in CLAIMS + (NOISE,):
        where = f"{c.category} → `{c.role}`" if c.category else "–"
        rows.append(f"| {c.text} | {where} | `{c.arm}` − `{c.reference}` | {c.paper} |")
    return "\n".join(rows)


def claims_table(experiments: list[Experiment]) -> str:
    """A row per claim, a column per setting, and the legend that says what each column is."""
    head = "| claim | " + " | ".join(f"({i}) {e.label}, Δ {e.metric.unit}" for i, e in enumerate(experiments, 1))
    rows = [head + " |", "|---|" + "---|" * len(experiments)]
    columns = [(check_setting(e), e) for e in experiments]
    for i, claim in enumerate(CLAIMS + (NOISE,)):
        rows.append(f"| {claim.text} | " + " | ".join(_cell_text(cells[i], e) for cells, e in columns) + " |")
    return "\n".join(rows)


def _seed_list(seeds: list[int]) -> str:
    """``0-7``, ``0, 1, 16``: runs of three or more consecutive seeds as a range."""
    if not seeds:
        return "none"
    parts, start = [], 0
    for k in range(1, len(seeds) + 1):
        if k == len(seeds) or seeds[k] != seeds[k - 1] + 1:
            run = seeds[start:k]
            parts += [f"{run[0]}-{run[-1]}"] if len(run) >= 3 else [str(x) for x in run]
            start = k
    return ", ".join(parts)


def settings_legend(experiments: list[Experiment]) -> str:
    lines = []
    for i, e in enumerate(experiments, 1):
        seeds = sorted({s for a in e.arms for s in a.values})
        failed = sum(a.failed for a in e.arms)
        src = ", ".join(f"`{s}`" for s in e.sources) or "?"
        d = decay_time(e)
        lines.append(f"- ({i}) {e.label}: {len(e.arms)} arms, seeds {_seed_list(seeds)}; "
                     f"{sum(a.n for a in e.arms)} finished runs" + (f", {failed} failed" if failed else "") +
                     f"; metric `{e.metric.key}`" + (f"; decay time D = {d:.2f}" if d is not None else "") +
                     f"; from {src}")
    return "\n".join(lines)


def claims_markdown(experiments: list[Experiment]) -> str:
    """The claims table with its legend and the claim-to-arm mapping, ready to paste."""
    return "\n".join([
        claims_table(experiments), "",
        "Each cell: the paired difference in the column's unit, mean over seeds [95% t interval, n-1 degrees "
        "of freedom], the number of paired seeds, and the verdict: **confirmed** where the interval excludes 0 "
        "in the paper's direction, **contradicted** where it excludes 0 in the other direction, *not shown* "
        "otherwise (\"not shown\" is not \"no effect\"). *Holm*: the same verdict after Holm's adjustment of the "
        "paired t tests' p values over the setting's six claims (family-wise 5%); read a single confirmed or "
        "contradicted cell whose Holm verdict is *not shown* as a lead, not a finding. *smaller than the "
        "paper's*: the interval excludes the paper's smallest effect, 1 accuracy point in its direction. "
        "*same policy*: the two arms decay the same parameters in that setting, so there is nothing to compare. "
        "The control row compares two arms with the same policy; its interval is the noise of identical "
        "settings.", "",
        settings_legend(experiments), "",
        "How the claims map to arms (the paper's categories to gammaguide's roles, as in docs/core.md):", "",
        mapping_table(),
    ])
