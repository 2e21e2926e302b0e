"""Paired differences between arms with t confidence intervals, and what they show.

Two arms of one setting are compared seed by seed: a seed fixes the initial weights and the
order of batches, crops and flips for every arm, so each seed's difference cancels most of
the seed noise. The interval is the t interval of the mean of those differences with n-1
degrees of freedom. A difference is *shown* only when its interval excludes zero; with
fewer than two paired seeds there is no interval, and nothing is shown.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

from ..errors import GammaGuideError

CONFIDENCE = 0.95
CONFIRMED, CONTRADICTED, NOT_SHOWN = "confirmed", "contradicted", "not shown"


@dataclass(frozen=True)
class Difference:
    """Mean of the per-seed differences ``arm - reference`` over the seeds both finished."""

    n: int  # paired seeds
    mean: float | None  # None when n == 0
    sd: float | None  # of the per-seed differences; None when n < 2
    low: float | None  # the confidence interval; None when n < 2
    high: float | None
    confidence: float = CONFIDENCE
    p: float | None = None  # two-sided p-value of the paired t test (mean 0); None when n < 2

    @property
    def has_interval(self) -> bool:
        return self.low is not None and self.high is not None

    @property
    def excludes_zero(self) -> bool:
        """The closed interval [low, high] does not contain 0 (an end at exactly 0 touches it)."""
        return self.has_interval and (self.low > 0 or self.high < 0)


def t_quantile(confidence: float, df: int) -> float:
    """The two-sided critical value of Student's t: P(|T| <= q) = confidence."""
    if not 0 < confidence < 1:
        raise GammaGuideError(f"bad confidence {confidence!r}: give a level between 0 and 1, e.g. 0.95")
    if df < 1:
        raise GammaGuideError(f"a t interval needs at least 1 degree of freedom (2 paired seeds), got df={df}")
    try:
        from scipy import stats
    except ImportError:
        raise GammaGuideError("confidence intervals need scipy; run: pip install 'gammaguide[experiments]'") from None
    return float(stats.t.ppf(0.5 + confidence / 2, df))


def paired_difference(arm: dict[int, float], reference: dict[int, float],
                      confidence: float = CONFIDENCE) -> Difference:
    """``arm`` and ``reference`` map seed -> metric of a finished run. Only seeds present in both
    are paired: a seed whose reference run is missing or failed says nothing about the difference."""
    diffs = [arm[s] - reference[s] for s in sorted(arm) if s in reference]
    n = len(diffs)
    if n == 0:
        return Difference(0, None, None, None, None, confidence)
    mean = statistics.fmean(diffs)
    if n < 2:
        return Difference(1, mean, None, None, None, confidence)
    sd = statistics.stdev(diffs)
    half = t_quantile(confidence, n - 1) * sd / math.sqrt(n)
    return Difference(n, mean, sd, mean - half, mean + half, confidence, t_p_value(mean, sd, n))


def t_p_value(mean: float, sd: float, n: int) -> float:
    """Two-sided p-value of the one-sample t test of ``n`` paired differences against 0."""
    if sd == 0:
        return 1.0 if mean == 0 else 0.0
    from scipy import stats

    return float(2 * stats.t.sf(abs(mean) / (sd / math.sqrt(n)), n - 1))


def holm(p_values: dict[str, float], alpha: float = 1 - CONFIDENCE) -> set[str]:
    """The hypotheses Holm's step-down procedure rejects at family-wise level ``alpha``: sorted by p,
    the i-th smallest (from 0) is rejected while p <= alpha / (m - i), and none after the first that
    is not."""
    rejected: set[str] = set()
    m = len(p_values)
    for i, (name, p) in enumerate(sorted(p_values.items(), key=lambda kv: kv[1])):
        if p > alpha / (m - i):
            break
        rejected.add(name)
    return rejected


def verdict(diff: Difference, direction: int) -> str:
    """``direction`` +1: the claim is that the arm is above the reference; -1: below."""
    if direction not in (1, -1):
        raise GammaGuideError(f"bad claim direction {direction!r}: give +1 (arm above reference) or -1 (below)")
    if not diff.excludes_zero:
        return NOT_SHOWN
    return CONFIRMED if (diff.low > 0) == (direction > 0) else CONTRADICTED
