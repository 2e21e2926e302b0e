"""The report's statistics: paired t intervals, verdicts per claim, the claims table over several
results files, metrics other than accuracy, and the report command. Every results file here is
written by the test itself."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from gammaguide import GammaGuideError
from gammaguide.cli import main
from gammaguide.experiments import claims as C
from gammaguide.experiments.report import load, write_claims, write_report
from gammaguide.experiments.stats import Difference, paired_difference, t_quantile, verdict
from gammaguide.experiments.summary import summarize

# Two-sided 95% critical values of Student's t from a printed table (df = 1, 2, 30).
T95 = {1: 12.706, 2: 4.303, 30: 2.042}


def record(arm: str, seed: int, value: float | None, *, status: str = "ok", metric: str | None = None,
           **settings) -> dict:
    key = metric or "test_acc"
    s = {"model": "resnet20", "data": "imagefolder:/x/cifar10-jpeg", "epochs": 15, "weight_decay": 5e-3,
         "subset": 10000, **settings, "policy": arm, "seed": seed}
    rec = {"key": f"{arm}-{seed}-{json.dumps(settings, sort_keys=True)}", "arm": arm, "seed": seed, "status": status,
           key: value if status == "ok" else None, "settings": s, "history": []}
    if metric is not None:
        rec["metric"] = metric
    return rec


def write(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def grid(values: dict[str, list[float]], **settings) -> list[dict]:
    """arm -> the metric of seeds 0, 1, ... (None: that seed's run failed)."""
    return [record(arm, s, v, status="ok" if v is not None else "failed", **settings)
            for arm, vs in values.items() for s, v in enumerate(vs)]


# ----------------------------------------------------------------------------- t intervals


@pytest.mark.parametrize("df", sorted(T95))
def test_t_quantile_matches_the_printed_table(df):
    assert t_quantile(0.95, df) == pytest.approx(T95[df], abs=5e-4)


def test_interval_with_two_seeds_uses_one_degree_of_freedom():
    # per-seed differences 0.02 and 0.04: mean 0.03, sd 0.02/sqrt(2), standard error 0.01
    d = paired_difference({0: 0.80, 1: 0.74}, {0: 0.78, 1: 0.70})
    half = T95[1] * (0.02 / math.sqrt(2)) / math.sqrt(2)
    assert (d.n, d.mean) == (2, pytest.approx(0.03))
    assert d.low == pytest.approx(0.03 - half, abs=1e-5) and d.high == pytest.approx(0.03 + half, abs=1e-5)
    assert not d.excludes_zero  # +3 points with 2 seeds at this spread: [-9.7, +15.7]


def test_interval_with_three_seeds_uses_two_degrees_of_freedom():
    diffs = [0.01, 0.02, 0.06]  # mean 0.03; squared deviations 4e-4 + 1e-4 + 9e-4 over 2: sd = sqrt(7e-4)
    d = paired_difference({s: 0.5 + x for s, x in enumerate(diffs)}, {s: 0.5 for s in range(3)})
    half = T95[2] * math.sqrt(7e-4) / math.sqrt(3)
    assert (d.n, d.mean, d.sd) == (3, pytest.approx(0.03), pytest.approx(math.sqrt(7e-4)))
    assert (d.low, d.high) == (pytest.approx(0.03 - half, abs=1e-5), pytest.approx(0.03 + half, abs=1e-5))


def test_fewer_than_two_paired_seeds_give_no_interval():
    one = paired_difference({0: 0.9, 1: 0.8}, {0: 0.7})
    assert (one.n, one.mean, one.low, one.high) == (1, pytest.approx(0.2), None, None)
    assert not one.has_interval and verdict(one, +1) == "not shown"  # +20 points, but one seed shows nothing
    none = paired_difference({1: 0.9}, {0: 0.7})
    assert (none.n, none.mean) == (0, None) and verdict(none, -1) == "not shown"


def test_bad_levels_are_refused():
    with pytest.raises(GammaGuideError, match="between 0 and 1"):
        t_quantile(95, 3)
    with pytest.raises(GammaGuideError, match="degree of freedom"):
        t_quantile(0.95, 0)
    with pytest.raises(GammaGuideError, match=r"\+1"):
        verdict(Difference(2, 0.1, 0.01, 0.05, 0.15), 0)


# ----------------------------------------------------------------------------- verdicts


@pytest.mark.parametrize("low, high, direction, expected", [
    (0.01, 0.05, +1, "confirmed"),
    (0.01, 0.05, -1, "contradicted"),
    (-0.05, -0.01, -1, "confirmed"),
    (-0.05, -0.01, +1, "contradicted"),
    (-0.01, 0.05, +1, "not shown"),
    (-0.01, 0.05, -1, "not shown"),
    (0.0, 0.05, +1, "not shown"),  # an interval that touches 0 does not exclude it
    (-0.05, 0.0, -1, "not shown"),
])
def test_verdict_from_the_interval(low, high, direction, expected):
    assert verdict(Difference(3, (low + high) / 2, 0.01, low, high), direction) == expected


def test_verdicts_of_the_claims_from_runs():
    # seeds differ a lot between each other, little within a seed: pairing is what makes effects visible
    base = [0.70, 0.80, 0.75]
    recs = grid({
        "no_gamma": base,
        "only:residual_last": [b - 0.02 + e for b, e in zip(base, (0, 0.002, -0.002), strict=True)],  # lower
        "only:scale_invariant": [b + 0.01 + e for b, e in zip(base, (0, 0.002, -0.002), strict=True)],  # higher
        "only:shortcut": [b + e for b, e in zip(base, (0.01, -0.01, 0.005), strict=True)],  # nothing shown
        "guidelines": [b + 0.01 for b in base],
        "all": [b + 0.03 for b in base],
    })
    (exp,) = summarize(recs)
    got = {c.arm + " vs " + c.reference: C.check(exp, c).verdict for c in C.CLAIMS}
    assert got == {
        "only:residual_last vs no_gamma": "contradicted",  # the paper says L2 on γ_last raises it
        "only:scale_invariant vs no_gamma": "confirmed",
        "only:shortcut vs no_gamma": "not shown",
        "only:stream vs no_gamma": "no run",
        "guidelines vs all": "contradicted",
        "guidelines vs no_gamma": "confirmed",
    }


# ----------------------------------------------------------------------------- counting and pairing


def test_failures_and_n_are_counted_and_only_shared_seeds_pair():
    recs = grid({"no_gamma": [0.70, 0.72, None, 0.74], "guidelines": [0.71, 0.74, 0.90, None]})
    recs.append(record("guidelines", 4, None))  # "ok" but its metric is missing: not a usable run
    recs.append(record("no_gamma", 4, float("nan")))
    (exp,) = summarize(recs)
    g, b = exp.arm("guidelines"), exp.arm("no_gamma")
    assert (g.n, g.failed, b.n, b.failed) == (3, 2, 3, 2)
    d = g.paired["no_gamma"]
    # seed 2 (no_gamma failed) and seed 3 (guidelines failed) are not paired: only seeds 0, 1
    assert (d.n, d.mean) == (2, pytest.approx(0.015))
    assert g.mean == pytest.approx((0.71 + 0.74 + 0.90) / 3)


def test_the_last_record_of_a_run_wins():
    recs = grid({"no_gamma": [0.70, 0.71], "all": [0.60, 0.61]}) + [record("all", 1, 0.75)]
    (exp,) = summarize(recs)
    assert exp.arm("all").values == {0: 0.60, 1: 0.75}


def test_no_norm_against_no_gamma_is_the_noise_row(tmp_path):
    same = grid({"no_gamma": [0.70, 0.80, 0.75], "no_norm": [0.70, 0.80, 0.75]})
    (exp,) = summarize(same)
    cell = C.check(exp, C.NOISE)
    assert cell.verdict == "no difference shown" and cell.difference.n == 3 and cell.difference.mean == 0
    drift = grid({"no_gamma": [0.70, 0.80, 0.75], "no_norm": [0.72, 0.821, 0.769]})  # +2 points, every seed
    (exp,) = summarize(drift)
    assert C.check(exp, C.NOISE).verdict == "differs from 0"
    table = C.claims_table([exp])
    row = next(line for line in table.splitlines() if line.startswith("| control"))
    assert "+2.00 [" in row and "n=3" in row and "differs from 0" in row


# ----------------------------------------------------------------------------- metrics


def test_the_record_metric_is_used_and_labelled(tmp_path):
    text = dict(model="tiny_translator", data="multi30k:/x/multi30k-de-en", epochs=10, weight_decay=0.01,
                subset=None)
    recs = [record(arm, s, bleu, metric="test_bleu", **text) for arm, vals in {
        "no_gamma": [30.0, 31.0, 29.5], "guidelines": [31.0, 32.5, 30.0], "only:residual_last": [30.5, 31.0, 30.0],
    }.items() for s, bleu in enumerate(vals)]
    for r in recs:
        r["test_acc"] = 0.5  # a decoy: the record says its metric is test_bleu
    (exp,) = summarize(recs)
    assert exp.metric.key == "test_bleu" and exp.metric.unit == "BLEU points"
    assert exp.arm("guidelines").mean == pytest.approx(31.1666, rel=1e-4)
    d = exp.arm("guidelines").paired["no_gamma"]  # differences 1.0, 1.5, 0.5
    half = T95[2] * 0.5 / math.sqrt(3)
    assert (d.mean, d.low) == (pytest.approx(1.0), pytest.approx(1.0 - half, abs=1e-3))
    table = C.claims_table([exp])
    assert "Δ BLEU points" in table and "accuracy" not in table
    rows = {line.split(" | ")[0][2:]: line for line in table.splitlines()[2:]}
    assert rows["L2 on γ_down lowers the metric"].endswith("| no run |")  # a transformer has no such arm
    assert rows["L2 on γ_first lowers the metric"].endswith("| no run |")
    assert "+1.00 [" in rows["the guidelines beat decaying no γ"]  # BLEU is shown as is, not x100
    report = write_report(write(tmp_path / "r.jsonl", recs), tmp_path / "out", plots=False).read_text()
    assert "| test BLEU (mean ± sd) |" in report and "Δ vs no_gamma, BLEU points [95% CI], n" in report


def test_accuracy_and_bleu_settings_are_separate_columns():
    recs = grid({"no_gamma": [0.7, 0.8], "guidelines": [0.71, 0.8]})
    recs += [record("no_gamma", s, 30.0 + s, metric="test_bleu") for s in range(2)]
    exps = summarize(recs)
    assert sorted(e.metric.unit for e in exps) == ["BLEU points", "accuracy points"]
    head = C.claims_table(exps).splitlines()[0]
    assert "Δ accuracy points" in head and "Δ BLEU points" in head


# ----------------------------------------------------------------------------- several files


def test_claims_table_over_several_files(tmp_path):
    a = write(tmp_path / "a" / "results.jsonl", grid({
        "no_gamma": [0.70, 0.80, 0.75], "only:stream": [0.69, 0.79, 0.74], "guidelines": [0.71, 0.80, 0.76]}))
    # one setting sharded over two files, another setting (other weight decay and epochs) in the second
    b1 = grid({"no_gamma": [0.60, 0.65]}, weight_decay=5e-4, epochs=40)
    b2 = grid({"no_gamma": [None, None, 0.62], "all": [0.61, 0.66, 0.63]}, weight_decay=5e-4, epochs=40)[2:]
    b = write(tmp_path / "b" / "results.jsonl", b1 + b2[:3])
    c = write(tmp_path / "c" / "results.jsonl", b2[3:])
    exps = load([a, b, c])
    assert [e.label for e in exps] == ["resnet20 · cifar10-jpeg (10,000 train) · 15 epochs · wd 5e-3",
                                       "resnet20 · cifar10-jpeg (10,000 train) · 40 epochs · wd 5e-4"]
    assert exps[1].sources == [str(b), str(c)] and exps[1].arm("all").n == 3 and exps[1].arm("no_gamma").n == 3
    text = C.claims_markdown(exps)
    table = text.split("\n\n")[0].splitlines()
    assert table[0] == ("| claim | (1) resnet20 · cifar10-jpeg (10,000 train) · 15 epochs · wd 5e-3, Δ accuracy points"
                        " | (2) resnet20 · cifar10-jpeg (10,000 train) · 40 epochs · wd 5e-4, Δ accuracy points |")
    rows = {line.split(" | ")[0][2:]: line.split(" | ")[1:] for line in table[2:]}
    # -1 point on every seed
    assert rows["L2 on γ_first lowers the metric"][0].endswith("n=3: **confirmed**; Holm: **confirmed**")
    assert rows["L2 on γ_first lowers the metric"][1] == "no run |"
    assert rows["the guidelines beat decaying every γ"] == ["no run", "no run |"]
    assert rows["the guidelines beat decaying no γ"][1] == "no run |"
    assert "n=3" in rows["the guidelines beat decaying no γ"][0]
    # the mapping of claims to arms is printed with the table
    assert "| L2 on γ_down lowers the metric | γ_down → `shortcut` | `only:shortcut` − `no_gamma` |" in text
    assert f"from `{b}`, `{c}`" in text


def test_missing_or_empty_files_are_refused(tmp_path):
    with pytest.raises(GammaGuideError, match="results file not found: .*nope.jsonl"):
        load([tmp_path / "nope.jsonl"])
    with pytest.raises(GammaGuideError, match="holds no runs"):
        load(write(tmp_path / "empty.jsonl", [{"note": "no run here"}]))


# ----------------------------------------------------------------------------- command line


@pytest.fixture
def two_files(tmp_path):
    a = write(tmp_path / "a" / "results.jsonl", grid({
        "no_gamma": [0.70, 0.80, 0.75], "guidelines": [0.72, 0.82, 0.77], "all": [0.70, 0.81, 0.74]}))
    b = write(tmp_path / "b" / "results.jsonl", grid({"no_gamma": [0.6, 0.7], "guidelines": [0.6, 0.71]}, epochs=4))
    return a, b


def test_report_command_claims_mode_prints_the_table(two_files, tmp_path, capsys):
    a, b = two_files
    assert main(["report", str(a), str(b), "--claims"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"<!-- made by: gammaguide report {a} {b} --claims -->")
    assert ("| the guidelines beat decaying no γ | +2.00 [+2.00, +2.00], n=3: **confirmed**; Holm: **confirmed** |"
            in out)
    assert "4 epochs" in out and "15 epochs" in out
    assert main(["report", str(a), str(b), "--claims", "--out", str(tmp_path / "c")]) == 0
    written = capsys.readouterr().out
    assert (tmp_path / "c" / "claims.md").read_text() == written and f"--claims --out {tmp_path / 'c'} -->" in written


def test_report_command_single_file_writes_the_full_report(two_files, tmp_path, capsys):
    a, _ = two_files
    assert main(["report", str(a), "--out", str(tmp_path / "r"), "--no-plots"]) == 0
    path = Path(capsys.readouterr().out.strip())
    text = path.read_text()
    assert path == tmp_path / "r" / "report.md"
    assert "## The paper's claims" in text and "| claim | (1) resnet20" in text
    assert "| guidelines | 3 | 0 | 77.00 ± 5.00 | **+2.00 [+2.00, +2.00], n=3** | +2.00 [" in text
    assert "| no_gamma | 3 | 0 | 75.00 ± 5.00 | - |" in text


@pytest.mark.parametrize("extra, message", [
    ([], "report needs --out DIR"),
    (["--claims", "--title", "x"], "--title"),
])
def test_report_command_errors_are_one_line(two_files, extra, message, capsys):
    a, _ = two_files
    assert main(["report", str(a), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("gammaguide: error:") and message in err


def test_write_claims_is_what_the_command_prints(two_files, capsys):
    a, b = two_files
    assert main(["report", str(a), str(b), "--claims"]) == 0
    assert write_claims([a, b]) == capsys.readouterr().out


def test_mechanisms_get_paired_intervals_too(tmp_path):
    def run(arm, seed, gamma_last, ratio):
        rec = record(arm, seed, 0.7)
        rec["history"] = [{"epoch": 1, "gamma_abs": {"residual_last": gamma_last, "stream": 1.0},
                           "gamma_eff_lr": {"scale_invariant": 1e-4}, "variance_ratio": {"a": ratio, "b": ratio}}]
        return rec
    recs = [run("no_gamma", s, 1.0 + 0.01 * s, 0.8 + 0.1 * s) for s in range(3)]
    recs += [run("only:residual_last", s, 0.5 + 0.01 * s, (0.8 + 0.1 * s) * (1.5 - 0.5 * (s == 1))) for s in range(3)]
    text = write_report(write(tmp_path / "r.jsonl", recs), tmp_path / "out", plots=False).read_text()
    table = text[text.index("| arm − no_gamma |"):]
    row = next(line for line in table.splitlines() if line.startswith("| only:residual_last"))
    cells = row.split(" | ")
    assert cells[1] == "**-0.500 [-0.500, -0.500]**"  # |γ| residual_last: 0.5 lower on every seed
    assert cells[2] == "+0.000 [+0.000, +0.000]"  # |γ| stream: unchanged, not shown
    assert cells[4].startswith("+0.300 [") and not cells[4].startswith("**")  # +0.4, 0, +0.5: not shown
    assert "| only:residual_last | 3 | 0.510 | 1.000 | 1.00e-04 | 1.200 |" in text  # means over seeds


ROOT = Path(__file__).resolve().parents[1]
MADE_BY = "<!-- made by: gammaguide report "


# Every README that carries a generated claims table (the root README must): results READMEs of
# other grids are checked as soon as they paste one.
README_TABLES = ["README.md"] + sorted(str(p.relative_to(ROOT)) for p in ROOT.glob("results/*/README.md")
                                       if MADE_BY in p.read_text())


@pytest.mark.parametrize("readme", README_TABLES)
def test_committed_claims_tables_are_what_the_report_makes_of_the_committed_results(readme, monkeypatch):
    """A claims table pasted into a README is regenerated here from the results files it names: a
    results file or report code that changes without the README fails this test."""
    text = (ROOT / readme).read_text()
    commands = [line[len(MADE_BY):-len(" -->")].split() for line in text.splitlines() if line.startswith(MADE_BY)]
    assert len(commands) == 1, f"{readme} should carry exactly one generated claims table"
    (words,) = commands
    assert words[-1] == "--claims"
    monkeypatch.chdir(ROOT)
    assert write_claims(words[:-1]) in text


# ----------------------------------------------------------------------------- the text of cells and legends


def _cells(exp) -> dict:
    return {c.claim.text: c for c in C.check_setting(exp)}


def test_a_cell_counts_the_failed_runs_of_its_own_two_arms():
    recs = grid({
        "no_gamma": [0.70, 0.80, 0.75, None],         # 1 failed
        "guidelines": [0.71, 0.81, 0.76, 0.90],
        "all": [0.69, None, None, 0.50],              # 2 failed
        "only:stream": [None, None, None, None],      # every run failed: nothing to pair
        "only:shortcut": [0.72],                      # one seed: no interval
    })
    recs[0]["history"] = [{"decay_time": 0.5}, {"decay_time": 0.75}, {"decay_time": 1.25}]
    failed = next(r for r in recs if r["status"] == "failed")
    failed["history"] = [{"decay_time": 9.0}]  # a failed run's schedule is not the setting's
    (exp,) = summarize(recs)
    cells = _cells(exp)
    text = {claim: C._cell_text(cell, exp) for claim, cell in cells.items()}
    assert " (1 failed run): " in text["the guidelines beat decaying no γ"]
    assert " (2 failed runs): " in text["the guidelines beat decaying every γ"]
    assert text["L2 on γ_first lowers the metric"] == "no paired seed (5 failed runs): not shown"
    assert text["L2 on γ_down lowers the metric"] == "+2.00, n=1: no interval (n < 2) (1 failed run): not shown"
    assert text["L2 on γ_last raises the metric"] == "no run"
    # Holm's adjustment is over the claims with a t test: not a missing arm, nor one without pairs.
    for claim in ("L2 on γ_first lowers the metric", "L2 on γ_down lowers the metric",
                  "L2 on γ_last raises the metric"):
        assert cells[claim].holm is None and "Holm" not in text[claim], claim
    assert cells["the guidelines beat decaying no γ"].holm is not None
    assert "; Holm: " in text["the guidelines beat decaying no γ"]
    legend = C.settings_legend([exp])
    assert ": 5 arms, seeds 0-3; 10 finished runs, 7 failed; metric `test_acc`; decay time D = 1.25; from ?" \
        in legend


@pytest.mark.parametrize(("seeds", "text"), [([0, 1, 16], "0, 1, 16"), ([0, 1, 2, 3, 4, 5, 6, 7], "0-7"),
                                             ([0, 1, 2, 5, 8, 9, 10, 11], "0-2, 5, 8-11"), ([3], "3"), ([], "none")])
def test_a_legend_writes_consecutive_seeds_as_a_range(seeds, text):
    assert C._seed_list(seeds) == text


def test_a_legend_without_finished_runs_says_none():
    (exp,) = summarize(grid({"no_gamma": [None], "guidelines": [None]}))
    assert C.settings_legend([exp]).endswith(": 2 arms, seeds none; 0 finished runs, 2 failed; metric `test_acc`; "
                                             "from ?")


def test_a_missing_arm_is_stood_in_for_by_an_arm_that_decays_the_same():
    """In a model whose only γ are residual_last and head, ``guidelines`` decays exactly what
    ``only:residual_last`` would: it stands in for the missing arm, and the cell says so."""
    decayed = {"guidelines": {"residual_last": {"count": 3, "decayed": 3}, "head": {"count": 1, "decayed": 0}},
               "no_gamma": {"residual_last": {"count": 3, "decayed": 0}, "head": {"count": 1, "decayed": 0}}}
    base = [0.70, 0.80, 0.75]
    recs = grid({"no_gamma": base, "guidelines": [b + 0.01 + e for b, e in zip(base, (0, 0.002, -0.002), strict=True)]
                 + [None]})
    for r in recs:
        r["roles"] = decayed[r["arm"]]
    (exp,) = summarize(recs)
    cells = _cells(exp)
    last = cells["L2 on γ_last raises the metric"]
    assert (last.stand_in, last.verdict) == ("guidelines", "confirmed")
    text = C._cell_text(last, exp)
    assert text.startswith("+1.00 [") and " (1 failed run): **confirmed**" in text
    assert text.endswith(" (`guidelines` runs, the same policy here)")
    assert cells["the guidelines beat decaying every γ"].verdict == "no run"  # `all` also decays β: no stand-in
