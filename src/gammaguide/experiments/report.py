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

import json
import math
import shlex
import statistics
import warnings
from pathlib import Path
from typing import Any

from ..errors import GammaGuideError
from .claims import claims_markdown, format_difference
from .results import RESULTS_NAME, read_lines
from .stats import paired_difference
from .summary import (
    ALL, BASELINE, REFERENCES, ROLE_ORDER, ArmSummary, Experiment, _setting_key, mean_ratio, metric_key, setting_label,
    summarize,
)

__all__ = ["ArmSummary", "Experiment", "ROLE_ORDER", "load", "mean_ratio", "summarize", "write_claims",
           "write_report", "BASELINE", "ALL"]


def results_files(paths: str | Path | list) -> list[str | Path]:
    """The results files named: a folder stands for the results.jsonl in it (what ``ablate --out``
    made), a file for itself."""
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    return [Path(p) / RESULTS_NAME if Path(p).is_dir() else p for p in paths]


def load(paths: str | Path | list) -> list[Experiment]:
    """The experiments of one or more results files (or folders holding one), each knowing the
    files its runs came from."""
    paths = results_files(paths)
    missing = [str(p) for p in paths if not Path(p).is_file()]
    if missing:
        raise GammaGuideError(f"results file not found: {', '.join(missing)}; give the results.jsonl that "
                              f"'gammaguide ablate --out DIR' wrote (DIR/results.jsonl)")
    records, sources = [], []
    for p in paths:
        lines = read_lines(p)
        records += lines
        sources += [str(p)] * len(lines)
    disagree = conflicts(records, sources)
    if disagree:
        warnings.warn(disagree, stacklevel=2)
    experiments = summarize(records, sources)
    if not experiments:
        raise GammaGuideError(f"{', '.join(map(str, paths))} holds no runs (no line with 'arm' and 'seed'); "
                              f"run gammaguide ablate first")
    return experiments


def conflicts(records: list[dict[str, Any]], sources: list[str], limit: int = 4) -> str | None:
    """One line naming the runs (setting, arm, seed) that two files record with different results
    (status or metric), or None. ``summarize`` keeps a run's last record, which is right for a rerun
    within one file (``--retry-failed``) but a guess between files: say which."""
    seen: dict[tuple[str, Any, Any], tuple[str, tuple]] = {}
    found: list[str] = []
    for rec, src in zip(records, sources, strict=True):
        if "arm" not in rec or "seed" not in rec:
            continue
        key = (_setting_key(rec), rec["arm"], rec["seed"])
        metric = metric_key(rec)
        outcome = (rec.get("status"), rec.get(metric))
        old = seen.get(key)
        if old is not None and old[0] != src and old[1] != outcome:
            label = setting_label(json.loads(key[0])["settings"])
            found.append(f"{rec['arm']} seed {rec['seed']} of {label} ({_outcome(old[1], metric)} in {old[0]}, "
                         f"{_outcome(outcome, metric)} in {src})")
        seen[key] = (src, outcome)
    if not found:
        return None
    shown = "; ".join(found[:limit]) + (f"; and {len(found) - limit} more" if len(found) > limit else "")
    return (f"the results files disagree on {len(found)} run{'s' * (len(found) != 1)}: {shown}. The report uses the "
            f"record of the file given last; remove the stale records, or report the files separately.")


def _outcome(outcome: tuple, metric: str) -> str:
    status, value = outcome
    return f"{metric} {value:.4g}" if status == "ok" and isinstance(value, (int, float)) else f"{status}"


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


def _number(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def mechanisms(exp: Experiment) -> dict[str, dict[str, dict[int, float]]]:
    """arm -> quantity -> seed -> its value at the last epoch: mean |γ| per role, lr/‖γ‖² of the
    scale-invariant γ, and the mean var(branch)/var(skip) over the residual adds."""
    found: dict[str, dict[str, dict[int, float]]] = {}
    for a in exp.arms:
        q: dict[str, dict[int, float]] = {}
        for seed, row in _final(exp, a.arm).items():
            values = {f"\\|γ\\| {r}": _number((row.get("gamma_abs") or {}).get(r)) for r in ROLE_ORDER}
            values["lr/‖γ‖² scale_invariant"] = _number((row.get("gamma_eff_lr") or {}).get("scale_invariant"))
            values["var(branch)/var(skip)"] = mean_ratio(row)
            for name, v in values.items():
                if v is not None:
                    q.setdefault(name, {})[seed] = v
        if q:
            found[a.arm] = q
    return found


def _columns(found: dict[str, dict[str, dict[int, float]]]) -> list[str]:
    names = {n for q in found.values() for n in q}
    order = [f"\\|γ\\| {r}" for r in ROLE_ORDER] + ["lr/‖γ‖² scale_invariant", "var(branch)/var(skip)"]
    return [n for n in order if n in names]


def _fmt(name: str, v: float, signed: bool = False) -> str:
    spec = ("+" if signed else "") + (".2e" if name.startswith("lr/") else ".3f")
    return format(v, spec)


def mechanism_table(exp: Experiment) -> str:
    """The mechanisms at the last epoch, mean over seeds."""
    found = mechanisms(exp)
    cols = _columns(found)
    rows = ["| arm | seeds | " + " | ".join(("mean " if n.startswith("\\|") else "") + n for n in cols) + " |",
            "|" + "---|" * (len(cols) + 2)]
    for arm, q in found.items():
        seeds = len({s for v in q.values() for s in v})
        rows.append(f"| {arm} | {seeds} | " + " | ".join(
            _fmt(n, statistics.fmean(q[n].values())) if q.get(n) else "-" for n in cols) + " |")
    return "\n".join(rows)


def mechanism_differences(exp: Experiment) -> str:
    """Each mechanism's paired difference to no_gamma at the last epoch, with its 95% t interval."""
    found = mechanisms(exp)
    base = found.get(BASELINE)
    if not base:
        return f"(no finished `{BASELINE}` run with a history: no differences)"
    cols = _columns(found)
    rows = ["| arm − no_gamma | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 1)]
    for arm, q in found.items():
        if arm == BASELINE:
            continue
        cells = []
        for n in cols:
            d = paired_difference(q.get(n, {}), base.get(n, {}))
            if d.n == 0:
                cells.append("-")
            elif not d.has_interval:
                cells.append(f"{_fmt(n, d.mean, True)}, n=1")
            else:
                text = f"{_fmt(n, d.mean, True)} [{_fmt(n, d.low, True)}, {_fmt(n, d.high, True)}]"
                cells.append(f"**{text}**" if d.excludes_zero else text)
        rows.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _settings_line(s: dict[str, Any]) -> str:
    keys = ("model", "data", "epochs", "subset", "test_subset", "batch_size", "lr", "schedule", "weight_decay",
            "momentum", "nesterov", "warmup_epochs", "width", "layers", "label_smoothing")
    line = ", ".join(f"{k}={s[k]}" for k in keys if k in s and s[k] is not None)
    if s.get("optimizer") == "adamw":  # text runs: say how the decay acts
        line += "; AdamW with decoupled weight decay (p -= lr * weight_decay * p), not an L2 term in the loss"
    return line


def _command(paths: list, out: Path | None, title: str | None, claims: bool = False) -> str:
    words = ["gammaguide", "report", *map(str, paths)] + (["--claims"] if claims else [])
    words += ["--out", str(out)] if out is not None else []
    words += ["--title", title] if title else []
    return shlex.join(words)


def write_report(paths: str | Path | list, out: str | Path, *, plots: bool = True,
                 title: str | None = None) -> Path:
    """Write ``out/report.md`` (and PNG plots beside it) from one or more results files."""
    paths = results_files(paths)
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
                  arm_table(exp), "", "### The two mechanisms at the last epoch", "", "Mean over seeds:", "",
                  mechanism_table(exp), "",
                  f"Paired difference to `{BASELINE}` [95% t interval] over the same seeds (bold: the interval "
                  "excludes 0):", "", mechanism_differences(exp), ""]
        if plots:
            from . import plots as plotting

            for name, caption in plotting.plot_experiment(exp, out, suffix):
                lines += [f"![{caption}]({name})", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def write_claims(paths: str | Path | list, out: str | Path | None = None) -> str:
    """The claims table over every setting of the results files (markdown); also ``out/claims.md`` if given."""
    paths = results_files(paths)
    text = (f"<!-- made by: {_command(paths, Path(out) if out is not None else None, None, claims=True)} -->\n\n"
            + claims_markdown(load(paths)) + "\n")
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "claims.md").write_text(text)
    return text
