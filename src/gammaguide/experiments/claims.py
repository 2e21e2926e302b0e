"""The paper's claims, each checked in every setting: a verdict from a paired t interval.

A claim compares two arms of one setting seed by seed. It is **confirmed** where the 95% interval
of the paired difference excludes 0 in the paper's direction, **contradicted** where it excludes 0
in the other direction, and **not shown** otherwise (whatever the sign of the mean, and always
with fewer than 2 paired seeds). A setting without one of the two arms says "no run".

Claims map to arms the way the role table of docs/core.md maps the paper's categories to roles:
γ_last -> ``residual_last``, γ_others -> ``scale_invariant``, γ_down -> ``shortcut``,
γ_first -> ``stream``; "L2 on γ_X" is the arm that decays that role's γ alone, against decaying none.
"""

from __future__ import annotations

from dataclasses import dataclass

from .stats import CONFIRMED, CONTRADICTED, Difference, verdict
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


CLAIMS = (
    Claim("L2 on γ_last raises the metric", "γ_last", "residual_last", "only:residual_last", BASELINE, 1,
          "+1 to +4 points"),
    Claim("L2 on γ_others raises the metric", "γ_others", "scale_invariant", "only:scale_invariant", BASELINE, 1,
          "+1 to +4 points"),
    Claim("L2 on γ_down lowers the metric", "γ_down", "shortcut", "only:shortcut", BASELINE, -1, "-1 to -3 points"),
    Claim("L2 on γ_first lowers the metric", "γ_first", "stream", "only:stream", BASELINE, -1, "-1 to -3 points"),
    Claim("the guidelines beat decaying every γ", "", "", "guidelines", ALL, 1, "higher"),
    Claim("the guidelines beat decaying no γ", "", "", "guidelines", BASELINE, 1, "higher"),
)
# no_norm and no_gamma are one policy (no γ, β or bias decayed): their difference is the noise of
# two runs of identical settings, which every claim's difference has to stand out from.
NOISE = Claim("control: identical settings (noise)", "", "", NO_NORM, BASELINE, 0, "0 (the same policy)")

NO_RUN = "no run"
NOISE_SHOWN, NOISE_NOT_SHOWN = "differs from 0", "no difference shown"


@dataclass(frozen=True)
class Cell:
    """One claim in one setting."""

    claim: Claim
    difference: Difference | None  # None: one of the two arms has no run in the setting
    verdict: str  # confirmed / contradicted / not shown / no run (the control: differs from 0 / no difference shown)


def check(exp: Experiment, claim: Claim) -> Cell:
    diff = exp.difference(claim.arm, claim.reference)
    if diff is None:
        return Cell(claim, None, NO_RUN)
    if claim.direction == 0:
        return Cell(claim, diff, NOISE_SHOWN if diff.excludes_zero else NOISE_NOT_SHOWN)
    return Cell(claim, diff, verdict(diff, claim.direction))


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


def _cell_text(cell: Cell, exp: Experiment) -> str:
    if cell.difference is None:
        return NO_RUN
    v = f"**{cell.verdict}**" if cell.verdict in (CONFIRMED, CONTRADICTED, NOISE_SHOWN) else cell.verdict
    failed = sum(a.failed for a in exp.arms if a.arm in (cell.claim.arm, cell.claim.reference))
    extra = f" ({failed} failed run{'s' * (failed > 1)})" if failed else ""
    return f"{format_difference(cell.difference, exp.metric.scale)}{extra}: {v}"


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
    for claim in CLAIMS + (NOISE,):
        rows.append(f"| {claim.text} | " + " | ".join(_cell_text(check(e, claim), e) for e in experiments) + " |")
    return "\n".join(rows)


def settings_legend(experiments: list[Experiment]) -> str:
    lines = []
    for i, e in enumerate(experiments, 1):
        seeds = sorted({s for a in e.arms for s in a.values})
        failed = sum(a.failed for a in e.arms)
        src = ", ".join(f"`{s}`" for s in e.sources) or "?"
        lines.append(f"- ({i}) {e.label}: {len(e.arms)} arms, seeds {', '.join(map(str, seeds)) or 'none'}, "
                     f"{sum(a.n for a in e.arms)} finished runs" + (f", {failed} failed" if failed else "") +
                     f"; metric `{e.metric.key}`; from {src}")
    return "\n".join(lines)


def claims_markdown(experiments: list[Experiment]) -> str:
    """The claims table with its legend and the claim-to-arm mapping, ready to paste."""
    return "\n".join([
        claims_table(experiments), "",
        "Each cell: the paired difference in the column's unit, mean over seeds [95% t interval, n-1 degrees "
        "of freedom], the number of paired seeds, and the verdict: **confirmed** where the interval excludes 0 "
        "in the paper's direction, **contradicted** where it excludes 0 in the other direction, *not shown* "
        "otherwise. The control row compares two arms with the same policy; its interval is the noise of "
        "identical settings.", "",
        settings_legend(experiments), "",
        "How the claims map to arms (the paper's categories to gammaguide's roles, as in docs/core.md):", "",
        mapping_table(),
    ])
