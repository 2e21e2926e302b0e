"""``gammaguide monitor RUN.jsonl [...] --out DIR``: draw what ``gg.Monitor`` recorded.

The panels are those of the ablation report's mechanisms, over optimizer steps instead of epochs,
one line per run: mean |γ| per role, the effective learning rate (scale-invariant γ and weights)
with the decay time, and var(branch)/var(skip) at the residual sums. matplotlib is imported only
when drawing.
"""

from __future__ import annotations

import argparse
import math
import statistics
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from .errors import GammaGuideError

ROLE_ORDER = ("residual_last", "scale_invariant", "merged", "shortcut", "stream", "head")


def pyplot(missing: str = "drawing needs matplotlib; run: pip install matplotlib"):
    """matplotlib's pyplot on the file-only Agg backend; ``missing`` is the error when it is not installed.
    Shared with the ablation report's plots (experiments/plots.py)."""
    try:
        import matplotlib
    except ImportError:
        raise GammaGuideError(missing) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figures(plt, plots, subject, colors, out: Path, name: Callable[[str], str],
                 dpi: int) -> list[tuple[str, str]]:
    """Draw each ``(stem, caption, draw)`` of ``plots`` from ``subject`` and save it as ``out/name(stem)``;
    a ``draw`` that returns None (nothing to show) is skipped. Returns (file name, caption) pairs."""
    written = []
    for stem, caption, draw in plots:
        fig = draw(plt, subject, colors)
        if fig is None:
            continue
        fig.tight_layout()
        fig.savefig(out / name(stem), dpi=dpi)
        plt.close(fig)
        written.append((name(stem), caption))
    return written


def legend(ax) -> None:
    """A legend where the panel has labelled lines (a role or run may have none to draw)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)


Run = Sequence[Mapping[str, Any]]  # one run's records, as Record.to_dict() gives them


def _series(run: Run, get: Callable[[Mapping[str, Any]], Any]) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for rec in run:
        v = get(rec)
        if isinstance(v, (int, float)) and math.isfinite(v):
            xs.append(rec["step"])
            ys.append(float(v))
    return xs, ys


def _role(rec: Mapping[str, Any], role: str, key: str) -> Any:
    return ((rec.get("roles") or {}).get(role) or {}).get(key)


def _mean_variance(rec: Mapping[str, Any]) -> float | None:
    vals = [v for v in (rec.get("variance") or {}).values()
            if isinstance(v, (int, float)) and math.isfinite(v) and v > 0]
    return statistics.fmean(vals) if vals else None


def _decay_time(rec: Mapping[str, Any]) -> float | None:
    """The largest decay time of the run's groups (the decayed weights')."""
    vals = [g.get("decay_time") for g in (rec.get("groups") or {}).values()]
    vals = [v for v in vals if isinstance(v, (int, float))]
    return max(vals) if vals else None


def plot_runs(runs: Mapping[str, Run], out: str | Path, prefix: str = "monitor_") -> list[tuple[str, str]]:
    """Draw ``runs`` (label -> records) into ``out``; returns (file name, caption) pairs."""
    if not runs or not any(runs.values()):
        raise GammaGuideError("no monitor records to draw")
    plt = pyplot()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cmap = plt.get_cmap("tab10")
    colors = {label: cmap(i % 10) for i, label in enumerate(runs)}
    return save_figures(plt, _PLOTS, runs, colors, out, lambda stem: f"{prefix}{stem}.png", dpi=80)


def _gamma(plt, runs, colors):
    """Mean |γ| per role over steps: a panel per role, a line per run."""
    roles = [r for r in ROLE_ORDER
             if any(_role(rec, r, "gamma_abs") is not None for run in runs.values() for rec in run)]
    if not roles:
        return None
    fig, axes = plt.subplots(1, len(roles), figsize=(3.4 * len(roles), 3.0), squeeze=False)
    for ax, role in zip(axes[0], roles, strict=True):
        for label, run in runs.items():
            x, y = _series(run, lambda rec, r=role: _role(rec, r, "gamma_abs"))
            if x:
                ax.plot(x, y, color=colors[label], label=label)
        ax.set_title(f"mean |γ|: {role}", fontsize=9)
        ax.set_xlabel("step")
    legend(axes[0][0])
    return fig


def _effective_lr(plt, runs, colors):
    """lr/‖γ‖² of the scale-invariant γ, lr/‖W‖² of the scale-invariant weights, and the decay time."""
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.0))
    gets = (lambda rec: _role(rec, "scale_invariant", "eff_lr"),
            lambda rec: (rec.get("weights") or {}).get("eff_lr"),
            _decay_time)
    for label, run in runs.items():
        for ax, get in zip(axes, gets, strict=True):
            x, y = _series(run, get)
            if x:
                ax.plot(x, y, color=colors[label], label=label)
    axes[0].set_title("lr / ‖γ‖², scale_invariant γ", fontsize=9)
    axes[1].set_title("lr / ‖W‖², scale-invariant weights", fontsize=9)
    axes[2].set_title("decay time Σ lr·λ (decayed groups)", fontsize=9)
    for ax in axes[:2]:
        _log_scale(ax)
    for ax in axes:
        ax.set_xlabel("step")
    legend(axes[0])
    return fig


def _variance(plt, runs, colors):
    """var(branch)/var(skip): mean over the sums per probe, and per sum at the last probe."""
    if not any(rec.get("variance") for run in runs.values() for rec in run):
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.2))
    ticks: list[str] = []
    for label, run in runs.items():
        x, y = _series(run, _mean_variance)
        if x:
            axes[0].plot(x, y, color=colors[label], label=label, marker=".")
        last = next((rec["variance"] for rec in reversed(run) if rec.get("variance")), None)
        if last:
            names = list(last)
            axes[1].plot(range(len(names)), [last[n] for n in names], color=colors[label], marker="o", label=label)
            ticks = names
    axes[0].set_title("mean var(branch)/var(skip) over residual sums", fontsize=9)
    axes[0].set_xlabel("step")
    axes[1].set_title("var(branch)/var(skip) per sum, last probe", fontsize=9)
    if ticks:
        axes[1].set_xticks(range(len(ticks)), ticks, rotation=60, fontsize=6, ha="right")
    for ax in axes:
        ax.axhline(1.0, color="gray", lw=0.6, ls="--")
        _log_scale(ax)
    legend(axes[0])
    return fig


_PLOTS = (
    ("gamma", "mean |γ| per role over steps", _gamma),
    ("effective_lr", "effective learning rate of the scale-invariant γ and weights, and the decay time", _effective_lr),
    ("variance", "var(branch)/var(skip) at the residual sums", _variance),
)


def _log_scale(ax) -> None:
    if any(len(line.get_ydata()) and min(line.get_ydata()) > 0 for line in ax.get_lines()):
        ax.set_yscale("log")


# ----------------------------------------------------------------------------- command line


def register(sub) -> None:
    """Add ``gammaguide monitor`` to the command line's subparsers."""
    p = sub.add_parser(
        "monitor",
        help="draw the records of gg.Monitor (JSONL files): |γ| per role, effective LR, variance ratios",
        description="Draw what gg.Monitor recorded (Monitor.to_jsonl or a JSONL sink), one line per file: mean |γ| "
                    "per role, the effective learning rate of scale-invariant γ and weights with the decay time, and "
                    "var(branch)/var(skip) at the residual sums, over optimizer steps.",
    )
    p.add_argument("files", nargs="+", metavar="RUN.jsonl", help="monitor records, one file per run")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the PNG files")
    p.add_argument("--labels", metavar="A,B", help="a label per file (default: the file names without .jsonl)")
    p.set_defaults(func=run_cli)


def run_cli(args: argparse.Namespace) -> int:
    from .monitor import read_jsonl

    labels = args.labels.split(",") if args.labels else [Path(f).stem for f in args.files]
    if len(labels) != len(args.files):
        raise GammaGuideError(f"--labels has {len(labels)} labels for {len(args.files)} files; give one per file")
    if len(set(labels)) != len(labels):
        raise GammaGuideError(f"two runs have the same label ({', '.join(labels)}); pass --labels a,b,...")
    runs = {}
    for label, f in zip(labels, args.files, strict=True):
        records = read_jsonl(f)
        if not records:
            raise GammaGuideError(f"{f} holds no monitor records")
        runs[label] = [r.to_dict() for r in records]
    for name, caption in plot_runs(runs, args.out):
        print(f"{Path(args.out) / name}: {caption}")
    return 0
