"""The ablation report, made from results files alone: a markdown report and PNG plots.

First the claims table (``claims``): each claim of the paper in each setting, a paired difference
with its 95% t interval and a verdict. Then per setting, per arm: finished runs, failures, mean ±
sd of the metric over seeds, and the *paired* difference to ``no_gamma`` and to ``all`` (each
seed's arm minus the same seed's reference: the same initial weights and batches, so the seed
noise cancels) with its 95% t interval (``stats``).

Mechanisms (the paper's two analyses): mean |γ| per role and the effective learning rate
lr/||γ||² of scale-invariant γ at the last epoch, and var(branch)/var(skip) at the residual
additions with its paired difference to ``no_gamma``; the plots follow them over epochs.
"""

from __future__ import annotations

import shlex
import statistics
from pathlib import Path
from typing import Any

from ..errors import GammaGuideError
from .claims import claims_markdown, format_difference
from .results import read_lines
from .stats import paired_difference
from .summary import ALL, BASELINE, REFERENCES, ROLE_ORDER, ArmSummary, Experiment, mean_ratio, summarize

__all__ = ["ArmSummary", "Experiment", "ROLE_ORDER", "load", "mean_ratio", "summarize", "write_claims",
           "write_report", "BASELINE", "ALL"]


def load(paths: str | Path | list) -> list[Experiment]:
    """The experiments of one or more results files, each knowing the files its runs came from."""
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    missing = [str(p) for p in paths if not Path(p).is_file()]
    if missing:
        raise GammaGuideError(f"results file not found: {', '.join(missing)}; give the results.jsonl that "
                              f"'gammaguide ablate --out DIR' wrote (DIR/results.jsonl)")
    records, sources = [], []
    for p in paths:
        lines = read_lines(p)
        records += lines
        sources += [str(p)] * len(lines)
    experiments = summarize(records, sources)
    if not experiments:
        raise GammaGuideError(f"{', '.join(map(str, paths))} holds no runs (no line with 'arm' and 'seed'); "
                              f"run gammaguide ablate first")
    return experiments


# ----------------------------------------------------------------------------- markdown


def _value(v: float | None, scale: float) -> str:
    return "-" if v is None else f"{scale * v:.2f}"


def _versus(exp: Experiment, a: ArmSummary, ref: str) -> str:
    if a.arm == ref:
        return "-"
    diff = a.paired.get(ref)
    text = format_difference(diff, exp.metric.scale)
    return f"**{text}**" if diff is not None and diff.excludes_zero else text


def arm_table(exp: Experiment) -> str:
    m = exp.metric
    rows = [f"| arm | finished runs | failed | {m.value_label} (mean ± sd) | "
            + " | ".join(f"Δ vs {ref}, {m.unit} [95% CI], n" for ref in REFERENCES) + " |",
            "|---|---|---|---|---|---|"]
    for a in exp.arms:
        value = _value(a.mean, m.scale) + (f" ± {_value(a.sd, m.scale)}" if a.sd is not None else "")
        rows.append(f"| {a.arm} | {a.n} | {a.failed} | {value} | "
                    + " | ".join(_versus(exp, a, ref) for ref in REFERENCES) + " |")
    return "\n".join(rows)


def _final(exp: Experiment, arm: str) -> dict[int, dict[str, Any]]:
    """seed -> the last history row of the arm's finished run."""
    return {r["seed"]: r["history"][-1] for r in exp.runs
            if r.get("arm") == arm and r.get("status") == "ok" and r.get("history")}


def _final_ratios(exp: Experiment, arm: str) -> dict[int, float]:
    ratios = {s: mean_ratio(h) for s, h in _final(exp, arm).items()}
    return {s: v for s, v in ratios.items() if v is not None}


def mechanism_table(exp: Experiment) -> str:
    finals = {a.arm: list(_final(exp, a.arm).values()) for a in exp.arms}
    roles = [r for r in ROLE_ORDER if any(r in (h.get("gamma_abs") or {}) for hs in finals.values() for h in hs)]
    head = "| arm | seeds | " + " | ".join(f"mean \\|γ\\| {r}" for r in roles) + \
           f" | lr/‖γ‖² scale_invariant | mean var(branch)/var(skip) | its Δ vs {BASELINE} [95% CI], n |"
    rows = [head, "|" + "---|" * (len(roles) + 5)]
    base = _final_ratios(exp, BASELINE)
    for a in exp.arms:
        hs = finals[a.arm]
        if not hs:
            continue
        cells = [str(len(hs))]
        for r in roles:
            vals = [h["gamma_abs"][r] for h in hs if (h.get("gamma_abs") or {}).get(r) is not None]
            cells.append(f"{statistics.fmean(vals):.3f}" if vals else "-")
        eff = [h["gamma_eff_lr"]["scale_invariant"] for h in hs
               if (h.get("gamma_eff_lr") or {}).get("scale_invariant") is not None]
        ratios = _final_ratios(exp, a.arm)
        cells.append(f"{statistics.fmean(eff):.2e}" if eff else "-")
        cells.append(f"{statistics.fmean(ratios.values()):.3f}" if ratios else "-")
        if a.arm == BASELINE or not base or not ratios:
            cells.append("-")
        else:
            diff = paired_difference(ratios, base)
            text = format_difference(diff, 1.0)
            cells.append(f"**{text}**" if diff.excludes_zero else text)
        rows.append(f"| {a.arm} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _settings_line(s: dict[str, Any]) -> str:
    keys = ("model", "data", "epochs", "subset", "test_subset", "batch_size", "lr", "schedule", "weight_decay",
            "momentum", "nesterov", "warmup_epochs")
    return ", ".join(f"{k}={s[k]}" for k in keys if k in s and s[k] is not None)


def _command(paths: list, out: Path | None, title: str | None, claims: bool = False) -> str:
    words = ["gammaguide", "report", *map(str, paths)] + (["--claims"] if claims else [])
    words += ["--out", str(out)] if out is not None else []
    words += ["--title", title] if title else []
    return shlex.join(words)


def write_report(paths: str | Path | list, out: str | Path, *, plots: bool = True,
                 title: str | None = None) -> Path:
    """Write ``out/report.md`` (and PNG plots beside it) from one or more results files."""
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    experiments = load(paths)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    runs = sum(len(e.runs) for e in experiments)
    lines = [f"# {title or 'gammaguide ablation report'}", "",
             f"Made by `{_command(paths, out, title)}` from {runs} runs in {len(experiments)} setting"
             f"{'s' * (len(experiments) > 1)}. The metric is each run's final `metric` (test accuracy unless the "
             "record names another). *Paired* differences compare each seed's run with the same seed's reference "
             "run (the same initial weights, batches, crops and flips, so most seed noise cancels); the interval "
             "is the 95% t interval of their mean with n-1 degrees of freedom, n the seeds both arms finished. "
             "With n < 2 there is no interval. A difference is shown (bold) only where its interval excludes 0.",
             "", "## The paper's claims", "", claims_markdown(experiments), ""]
    for i, exp in enumerate(experiments):
        suffix = f"-{i + 1}" if len(experiments) > 1 else ""
        heading = f"({i + 1}) {exp.label}" if len(experiments) > 1 else exp.label
        lines += [f"## {heading}", "", f"Settings: {_settings_line(exp.settings)}; metric `{exp.metric.key}`.", "",
                  arm_table(exp), "", "### The two mechanisms at the last epoch (mean over seeds)", "",
                  mechanism_table(exp), ""]
        if plots:
            from . import plots as plotting

            for name, caption in plotting.plot_experiment(exp, out, suffix):
                lines += [f"![{caption}]({name})", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def write_claims(paths: str | Path | list, out: str | Path | None = None) -> str:
    """The claims table over every setting of the results files (markdown); also ``out/claims.md`` if given."""
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    text = (f"<!-- made by: {_command(paths, Path(out) if out is not None else None, None, claims=True)} -->\n\n"
            + claims_markdown(load(paths)) + "\n")
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "claims.md").write_text(text)
    return text
