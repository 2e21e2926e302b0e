"""The statistics (experiments/stats.py) at their edges: the confidence level a difference keeps,
levels refused, the p-value against scipy's t test, Holm's bound taken as inclusive, and the
message without scipy."""

from __future__ import annotations

import sys

import pytest

from gammaguide import GammaGuideError
from gammaguide.experiments.stats import CONFIDENCE, holm, paired_difference, t_quantile

ARM = {0: 0.71, 1: 0.64, 2: 0.93, 3: 0.80}
REFERENCE = {0: 0.50, 1: 0.52, 2: 0.55, 3: 0.61}


@pytest.mark.parametrize("seeds", [0, 1, 4])
def test_a_difference_keeps_its_confidence_level_whatever_the_number_of_seeds(seeds):
    arm = {s: ARM[s] for s in range(seeds)}
    d = paired_difference(arm, REFERENCE, confidence=0.9)
    assert (d.n, d.confidence) == (seeds, 0.9)
    if seeds < 2:
        assert (d.sd, d.low, d.high, d.p) == (None, None, None, None)
    else:
        assert d.low < d.mean < d.high
    assert paired_difference(arm, REFERENCE).confidence == CONFIDENCE == 0.95


def test_the_interval_and_p_value_are_scipys_paired_t_test():
    scipy_stats = pytest.importorskip("scipy.stats")
    diffs = [ARM[s] - REFERENCE[s] for s in ARM]
    d = paired_difference(ARM, REFERENCE, confidence=0.9)
    test = scipy_stats.ttest_1samp(diffs, 0.0)
    low, high = test.confidence_interval(0.9)
    assert d.p == pytest.approx(test.pvalue, rel=1e-9)
    assert (d.low, d.high) == (pytest.approx(low, rel=1e-9), pytest.approx(high, rel=1e-9))


@pytest.mark.parametrize("level", [0, 0.0, 1, 1.0, 1.5, -0.05, 95])
def test_levels_outside_the_open_interval_0_1_are_refused(level):
    with pytest.raises(GammaGuideError, match=f"^bad confidence {level!r}: give a level between 0 and 1"):
        t_quantile(level, 3)


def test_without_scipy_the_error_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "scipy", None)  # ``from scipy import stats`` raises ImportError
    with pytest.raises(GammaGuideError) as info:
        t_quantile(0.95, 3)
    assert str(info.value) == "confidence intervals need scipy; run: pip install 'gammaguide[experiments]'"


def test_holm_rejects_a_p_value_equal_to_its_bound():
    """Holm rejects the i-th smallest p while p <= alpha / (m - i): equality rejects (binary-exact
    numbers, so that the bound is met exactly)."""
    assert holm({"a": 0.25, "b": 0.5}, alpha=0.5) == {"a", "b"}
    assert holm({"a": 0.25, "b": 0.375, "c": 0.75}, alpha=0.75) == {"a", "b", "c"}
    assert holm({"a": 0.25, "b": 0.5000001}, alpha=0.5) == {"a"}
