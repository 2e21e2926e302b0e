"""What the claims table adds to a verdict: Holm's adjustment over a setting's claims, "smaller than
the paper's", "same policy" cells and an arm that stands in for a missing one with the same policy,
and the decay time D. Every record here is made by the test."""

from __future__ import annotations

import math

import pytest

from gammaguide.experiments import claims as C
from gammaguide.experiments.stats import Difference, holm, paired_difference, t_p_value
from gammaguide.experiments.summary import summarize

# resnet20-like role counts; what each policy decays of them
COUNTS = {"residual_last": 9, "scale_invariant": 9, "shortcut": 2, "stream": 1}
DECAYS = {"no_gamma": (), "no_norm": (), "guidelines": ("residual_last", "scale_invariant"), "all": tuple(COUNTS),
          "only:residual_last": ("residual_last",), "only:scale_invariant": ("scale_invariant",),
          "only:shortcut": ("shortcut",), "only:stream": ("stream",)}


def record(arm: str, seed: int, value: float, counts=COUNTS, decays=None, d: float | None = None) -> dict:
    decayed = decays if decays is not None else DECAYS[arm]
    settings = {"model": "resnet20", "data": "cifar100:/x", "epochs": 10, "weight_decay": 1e-2, "policy": arm,
                "seed": seed}
    history = [{"epoch": 10, "test_acc": value}] + ([] if d is None else [])
    if d is not None:
        history[-1]["decay_time"] = d
    return {"key": f"{arm}-{seed}", "arm": arm, "seed": seed, "status": "ok", "test_acc": value,
            "settings": settings, "history": history,
            "roles": {r: {"count": n, "decayed": n if r in decayed else 0} for r, n in counts.items()}}


def grid(values: dict[str, list[float]], **kw) -> list[dict]:
    return [record(arm, s, v, **kw) for arm, vs in values.items() for s, v in enumerate(vs)]


def test_p_value_is_the_paired_t_test():
    scipy_stats = pytest.importorskip("scipy.stats")
    a, b = [0.71, 0.74, 0.70, 0.77], [0.70, 0.72, 0.70, 0.74]
    d = paired_difference(dict(enumerate(a)), dict(enumerate(b)))
    assert d.p == pytest.approx(scipy_stats.ttest_rel(a, b).pvalue, rel=1e-9)
    assert t_p_value(0.0, 0.0, 3) == 1.0 and t_p_value(0.01, 0.0, 3) == 0.0  # no spread: all or nothing


def test_holm_steps_down_and_stops_at_the_first_kept_hypothesis():
    # m = 4: thresholds 0.05/4, 0.05/3, 0.05/2, 0.05/1
    assert holm({"a": 0.001, "b": 0.016, "c": 0.02, "d": 0.04}) == {"a", "b", "c", "d"}
    assert holm({"a": 0.001, "b": 0.03, "c": 0.04, "d": 0.001}) == {"a", "d"}  # b > 0.05/2 stops it, and c
    assert holm({"a": 0.013, "b": 0.001}) == {"a", "b"}  # b against 0.025, then a against 0.05
    assert holm({"a": 0.03, "b": 0.026}) == set()  # the smallest, 0.026 > 0.05/2: nothing rejected
    assert holm({}) == set()


def test_holm_verdict_can_take_back_a_single_cell():
    base = [0.60, 0.70, 0.65, 0.62]

    def shifted(*deltas):
        return [b + d for b, d in zip(base, deltas, strict=True)]

    recs = grid({
        "no_gamma": base,
        "only:scale_invariant": shifted(0.02, 0.021, 0.019, 0.0205),  # clear: +2 points on every seed
        "only:stream": shifted(-0.010, -0.006, -0.012, -0.004),  # marginal: p about 0.02
        "only:shortcut": shifted(0.01, -0.01, 0.005, -0.003),  # noise
        "all": shifted(0.004, -0.006, 0.001, 0.002),
        "guidelines": shifted(-0.005, 0.007, 0.0, 0.003),
    })
    (exp,) = summarize(recs)
    cells = {c.claim.text: c for c in C.check_setting(exp)}
    marginal = cells["L2 on γ_first lowers the metric"]
    # 5 tests; the marginal one is second smallest, so Holm holds it to 0.05 / 4
    assert marginal.verdict == "confirmed" and 0.05 / 4 < marginal.difference.p < 0.05
    assert marginal.holm == "not shown"
    clear = cells["L2 on γ_others raises the metric"]
    assert clear.verdict == "confirmed" and clear.holm == "confirmed"
    assert cells["L2 on γ_last raises the metric"].holm is None  # no run: not one of the tests
    assert "**confirmed**; Holm: not shown" in C.claims_table([exp])


def test_smaller_than_the_papers_smallest_effect():
    base = [0.60, 0.70, 0.65]
    recs = grid({
        "no_gamma": base,
        "only:residual_last": [b + 0.003 + e for b, e in zip(base, (0, 0.001, -0.001), strict=True)],  # +0.3
        "only:scale_invariant": [b + 0.02 + e for b, e in zip(base, (0, 0.001, -0.001), strict=True)],  # +2
        "only:shortcut": [b - 0.03 + e for b, e in zip(base, (0, 0.001, -0.001), strict=True)],  # -3: as the paper
        "only:stream": [b + 0.004 + e for b, e in zip(base, (0, 0.001, -0.001), strict=True)],  # the other way
    })
    (exp,) = summarize(recs)
    cells = {c.claim.arm: c for c in C.check_setting(exp)}
    assert cells["only:residual_last"].verdict == "confirmed" and cells["only:residual_last"].smaller
    assert not cells["only:scale_invariant"].smaller  # +2 points is within the paper's +1 to +4
    assert not cells["only:shortcut"].smaller
    # the interval excludes the paper's -1 point but lies on the other side of 0: contradicted, not "smaller"
    assert cells["only:stream"].verdict == "contradicted" and not cells["only:stream"].smaller
    assert "*smaller than the paper's*" in C.claims_table([exp])


@pytest.mark.parametrize("direction", [1, -1])
def test_an_interval_that_ends_at_the_papers_smallest_effect_does_not_exclude_it(direction, monkeypatch):
    """The interval is closed: one whose end is exactly the paper's 1 point still holds it."""
    recs = grid({"no_gamma": [0.6, 0.7, 0.65], "only:residual_last": [0.61, 0.71, 0.66],
                 "only:stream": [0.59, 0.69, 0.64]})
    (exp,) = summarize(recs)
    claim = C.CLAIMS[0] if direction > 0 else C.CLAIMS[3]
    assert claim.direction == direction
    for end, smaller in ((0.01, False), (0.0099, True)):
        low, high = (0.002, end) if direction > 0 else (-end, -0.002)
        diff = Difference(n=3, mean=(low + high) / 2, sd=0.001, low=low, high=high, p=0.01)
        monkeypatch.setattr(type(exp), "difference", lambda self, arm, ref, d=diff: d)
        cell = C.check(exp, claim)
        assert cell.verdict == "confirmed" and cell.smaller is smaller, (end, cell)


def test_arms_that_decay_the_same_gammas_are_same_policy_not_a_verdict():
    counts = {"residual_last": 9, "scale_invariant": 9, "stream": 1}  # no shortcut γ in this model
    recs = grid({"no_gamma": [0.6, 0.7, 0.65], "only:shortcut": [0.6, 0.7, 0.65], "all": [0.61, 0.69, 0.64]},
                counts=counts)
    (exp,) = summarize(recs)
    cell = next(c for c in C.check_setting(exp) if c.claim.arm == "only:shortcut")
    assert cell.verdict == "same policy" and cell.holm is None
    assert "same policy (`only:shortcut` decays what `no_gamma` decays here)" in C.claims_table([exp])


def test_a_missing_arm_is_stood_in_for_by_one_with_the_same_policy():
    # a pre-LN transformer: guidelines decays the block norms (residual_last) only, like only:residual_last
    counts = {"residual_last": 4, "head": 1}
    decays = {"guidelines": ("residual_last",), "no_gamma": (), "all": ("residual_last", "head")}
    recs = [record(arm, s, v, counts=counts, decays=decays[arm])
            for arm, vs in {"no_gamma": [0.79, 0.80, 0.81], "guidelines": [0.80, 0.805, 0.82],
                            "all": [0.79, 0.80, 0.80]}.items() for s, v in enumerate(vs)]
    (exp,) = summarize(recs)
    cell = C.check(exp, C.CLAIMS[0])  # L2 on γ_last: only:residual_last has no run
    assert cell.stand_in == "guidelines" and cell.difference.n == 3
    assert cell.difference.mean == pytest.approx((0.01 + 0.005 + 0.01) / 3)
    assert "(`guidelines` runs, the same policy here)" in C.claims_table([exp])
    # the head claim has no stand-in: nothing decays exactly the head alone... and stream has no γ at all
    stream = C.check(exp, C.CLAIMS[3])  # only:stream decays nothing here: no_gamma stands in, against itself
    assert stream.verdict == "same policy" and stream.stand_in == "no_gamma"


def test_a_stand_in_must_decay_exactly_the_same():
    counts = {"residual_last": 4, "scale_invariant": 2}
    recs = [record(arm, s, v, counts=counts) for arm, vs in {"no_gamma": [0.7, 0.8], "guidelines": [0.71, 0.81]}.items()
            for s, v in enumerate(vs)]
    (exp,) = summarize(recs)
    assert C.check(exp, C.CLAIMS[0]).verdict == "no run"  # guidelines also decays scale_invariant γ


def test_the_legend_gives_the_decay_time():
    recs = grid({"no_gamma": [0.6, 0.7], "all": [0.61, 0.69]}, d=1.973)
    (exp,) = summarize(recs)
    assert C.decay_time(exp) == pytest.approx(1.973)
    assert "decay time D = 1.97" in C.settings_legend([exp])
    (old,) = summarize(grid({"no_gamma": [0.6, 0.7], "all": [0.61, 0.69]}))
    assert C.decay_time(old) is None and "decay time" not in C.settings_legend([old])
    assert math.isfinite(C.decay_time(exp))
