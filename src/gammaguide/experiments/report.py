"""The ablation report, made from a results file alone: a markdown table and PNG plots.

Accuracy: per arm, mean ± standard deviation over seeds, the unpaired difference of means to
``no_gamma`` and ``all``, and the *paired* difference to ``no_gamma`` (each seed's arm minus the
same seed's ``no_gamma``: the same initial weights and batches, so the seed noise cancels),
with its standard error over seeds.

Mechanisms (the paper's two analyses): mean |γ| per role and the effective learning rate
lr/||γ||² of scale-invariant γ over epochs, and var(branch)/var(skip) at the residual
additions over epochs, each per arm.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from ..errors import GammaGuideError
from .ablate import ARMS
from .results import read_lines

BASELINE, ALL = "no_gamma", "all"
ROLE_ORDER = ("residual_last", "scale_invariant", "shortcut", "stream", "head")


@dataclass
class ArmSummary:
    arm: str
    accs: dict[int, float]  # seed -> final test accuracy (ok runs)
    failed: int
    mean: float | None
    std: float | None
    paired: dict[str, tuple[float, float | None, int]] = field(default_factory=dict)  # vs -> (mean, se, n)
    unpaired: dict[str, float | None] = field(default_factory=dict)


@dataclass
class Experiment:
    """The runs of one setting (everything but arm and seed equal)."""

    label: str
    settings: dict[str, Any]
    runs: list[dict[str, Any]]
    arms: list[ArmSummary]


def _setting_key(rec: dict[str, Any]) -> str:
    s = dict(rec.get("settings") or {})
    s.pop("policy", None)
    s.pop("seed", None)
    return json.dumps(s, sort_keys=True)


def _arm_order(arms: Iterable[str]) -> list[str]:
    arms = set(arms)
    return [a for a in ARMS if a in arms] + sorted(arms - set(ARMS))


def _mean_sd(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def summarize(records: list[dict[str, Any]]) -> list[Experiment]:
    """Group records into experiments and summarise each arm. The last record of a
    (setting, arm, seed) wins, so a results file with a rerun counts that run once."""
    groups: dict[str, dict[tuple[str, int], dict]] = {}
    for rec in records:
        if "arm" not in rec or "seed" not in rec:
            continue
        groups.setdefault(_setting_key(rec), {})[(rec["arm"], rec["seed"])] = rec
    experiments = []
    for key, runs in groups.items():
        settings = json.loads(key)
        # A record's primary metric: the key its "metric" names (text tasks), else test accuracy.
        ok = {(a, s): r[r.get("metric", "test_acc")] for (a, s), r in runs.items()
              if r.get("status") == "ok" and isinstance(r.get(r.get("metric", "test_acc")), (int, float))}
        arms = []
        for arm in _arm_order(a for a, _ in runs):
            accs = {s: v for (a, s), v in ok.items() if a == arm}
            mean, sd = _mean_sd(list(accs.values()))
            summary = ArmSummary(arm, dict(sorted(accs.items())), sum(
                1 for (a, _), r in runs.items() if a == arm and r.get("status") != "ok"), mean, sd)
            for ref in (BASELINE, ALL):
                if ref == arm:
                    continue
                ref_accs = {s: v for (a, s), v in ok.items() if a == ref}
                diffs = [accs[s] - ref_accs[s] for s in accs if s in ref_accs]
                if diffs:
                    m = statistics.fmean(diffs)
                    se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else None
                    summary.paired[ref] = (m, se, len(diffs))
                ref_mean = _mean_sd(list(ref_accs.values()))[0]
                summary.unpaired[ref] = None if mean is None or ref_mean is None else mean - ref_mean
            arms.append(summary)
        label = f"{settings.get('model', '?')} on {settings.get('data', '?')}"
        experiments.append(Experiment(label, settings, list(runs.values()), arms))
    return experiments


# ----------------------------------------------------------------------------- markdown


def _pct(v: float | None, signed: bool = False) -> str:
    if v is None:
        return "-"
    return f"{100 * v:+.2f}" if signed else f"{100 * v:.2f}"


def _paired(p: tuple[float, float | None, int] | None) -> str:
    if p is None:
        return "-"
    m, se, n = p
    return f"{100 * m:+.2f} ± {100 * se:.2f} (n={n})" if se is not None else f"{100 * m:+.2f} (n={n})"


def accuracy_table(exp: Experiment) -> str:
    rows = ["| arm | runs | test acc % (mean ± sd) | paired Δ vs no_gamma (± se) | Δ vs no_gamma | "
            "paired Δ vs all (± se) | Δ vs all |",
            "|---|---|---|---|---|---|---|"]
    for a in exp.arms:
        runs = f"{len(a.accs)}" + (f" (+{a.failed} failed)" if a.failed else "")
        acc = "-" if a.mean is None else _pct(a.mean) + (f" ± {_pct(a.std)}" if a.std is not None else "")
        rows.append(f"| {a.arm} | {runs} | {acc} | {_paired(a.paired.get(BASELINE))} | "
                    f"{_pct(a.unpaired.get(BASELINE), True)} | {_paired(a.paired.get(ALL))} | "
                    f"{_pct(a.unpaired.get(ALL), True)} |")
    return "\n".join(rows)


def _final(exp: Experiment, arm: str) -> list[dict[str, Any]]:
    return [r["history"][-1] for r in exp.runs if r.get("arm") == arm and r.get("status") == "ok" and r.get("history")]


def mechanism_table(exp: Experiment) -> str:
    roles = [r for r in ROLE_ORDER if any(r in (h.get("gamma_abs") or {}) for a in exp.arms for h in _final(exp, a.arm))]
    head = "| arm | " + " | ".join(f"mean \\|γ\\| {r}" for r in roles) + \
           " | lr/‖γ‖² scale_invariant | mean var(branch)/var(skip) |"
    rows = [head, "|" + "---|" * (len(roles) + 3)]
    for a in exp.arms:
        finals = _final(exp, a.arm)
        if not finals:
            continue
        cells = []
        for r in roles:
            vals = [h["gamma_abs"][r] for h in finals if (h.get("gamma_abs") or {}).get(r) is not None]
            cells.append(f"{statistics.fmean(vals):.3f}" if vals else "-")
        eff = [h["gamma_eff_lr"]["scale_invariant"] for h in finals
               if (h.get("gamma_eff_lr") or {}).get("scale_invariant") is not None]
        ratio = [mean_ratio(h) for h in finals]
        ratio = [v for v in ratio if v is not None]
        cells.append(f"{statistics.fmean(eff):.2e}" if eff else "-")
        cells.append(f"{statistics.fmean(ratio):.3f}" if ratio else "-")
        rows.append(f"| {a.arm} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def mean_ratio(row: dict[str, Any]) -> float | None:
    """The mean var(branch)/var(skip) over the residual adds of one history row."""
    vals = [v for v in (row.get("variance_ratio") or {}).values()
            if isinstance(v, (int, float)) and math.isfinite(v) and v > 0]
    return statistics.fmean(vals) if vals else None


def _settings_line(s: dict[str, Any]) -> str:
    keys = ("model", "data", "epochs", "subset", "test_subset", "batch_size", "lr", "schedule", "weight_decay",
            "momentum", "nesterov", "warmup_epochs", "width", "layers", "label_smoothing")
    line = ", ".join(f"{k}={s[k]}" for k in keys if k in s and s[k] is not None)
    if s.get("optimizer") == "adamw":  # text runs: say how the decay acts
        line += "; AdamW with decoupled weight decay (p -= lr * weight_decay * p), not an L2 term in the loss"
    return line


def write_report(paths: str | Path | list, out: str | Path, *, plots: bool = True,
                 title: str | None = None) -> Path:
    """Write ``out/report.md`` (and PNG plots beside it) from one or more results files."""
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    missing = [str(p) for p in paths if not Path(p).is_file()]
    if missing:
        raise GammaGuideError(f"results file not found: {', '.join(missing)}; give the results.jsonl that "
                              f"'gammaguide ablate --out DIR' wrote (DIR/results.jsonl)")
    records = read_lines(paths)
    experiments = summarize(records)
    if not experiments:
        raise GammaGuideError(f"{', '.join(map(str, paths))} holds no runs (no line with 'arm' and 'seed'); "
                              f"run gammaguide ablate first")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"# {title or 'gammaguide ablation report'}", "",
             f"Made by `gammaguide report {' '.join(map(str, paths))} --out {out}` from {len(records)} result lines. "
             "Accuracy is the final test accuracy. *Paired* differences compare each seed's run with the "
             "same seed's `no_gamma` (or `all`) run: the same initial weights, batches, crops and flips, so "
             "most seed noise cancels; ± is the standard error over seeds. Unpaired Δ is the difference of "
             "the means.", ""]
    for i, exp in enumerate(experiments):
        suffix = f"-{i + 1}" if len(experiments) > 1 else ""
        lines += [f"## {exp.label}", "", f"Settings: {_settings_line(exp.settings)}.", "",
                  accuracy_table(exp), "", "### The two mechanisms at the last epoch (mean over seeds)", "",
                  mechanism_table(exp), ""]
        if plots:
            from . import plots as plotting

            for name, caption in plotting.plot_experiment(exp, out, suffix):
                lines += [f"![{caption}]({name})", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
