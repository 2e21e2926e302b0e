"""PNG plots of an ablation (matplotlib, no display needed)."""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any, Callable

from ..monitor_plots import legend, pyplot, save_figures
from .summary import BASELINE, ROLE_ORDER, mean_ratio


def _plt():
    return pyplot("plots need matplotlib; run: pip install 'gammaguide[experiments]', or pass --no-plots")


def _series(exp, arm: str, get: Callable[[dict[str, Any]], float | None]) -> tuple[list[int], list[float]]:
    """Epoch -> mean over the arm's ok runs of ``get(history row)``."""
    by_epoch: dict[int, list[float]] = {}
    for r in exp.runs:
        if r.get("arm") != arm or r.get("status") != "ok":
            continue
        for row in r.get("history") or []:
            v = get(row)
            if v is not None and math.isfinite(v):
                by_epoch.setdefault(row["epoch"], []).append(v)
    epochs = sorted(by_epoch)
    return epochs, [statistics.fmean(by_epoch[e]) for e in epochs]


def _colors(plt, n: int):
    cmap = plt.get_cmap("tab10")
    return [cmap(i % 10) for i in range(n)]


def plot_experiment(exp, out: Path, suffix: str = "") -> list[tuple[str, str]]:
    """Write the plots of one experiment; returns (file name, caption) pairs."""
    plt = _plt()
    colors = dict(zip([a.arm for a in exp.arms], _colors(plt, len(exp.arms)), strict=True))
    return save_figures(plt, PLOTS, exp, colors, out, lambda stem: f"{stem}{suffix}.png", dpi=110)


def _accuracy(plt, exp, colors):
    """The metric per arm (mean ± sd, seeds as dots), and paired differences to no_gamma with 95% intervals."""
    m = exp.metric
    arms = [a for a in exp.arms if a.values]
    fig, (ax, paired_ax) = plt.subplots(1, 2, figsize=(12, 4.2))
    for i, a in enumerate(arms):
        ax.errorbar(i, m.scale * a.mean, yerr=m.scale * (a.sd or 0), fmt="o", color=colors[a.arm], capsize=4)
        ax.scatter([i] * a.n, [m.scale * v for v in a.values.values()], s=10, color="gray", zorder=3)
    ax.set_xticks(range(len(arms)), [a.arm for a in arms], rotation=35, ha="right")
    ax.set_ylabel(f"final {m.value_label}")
    ax.set_title(f"{m.name} per arm (mean ± sd; dots: seeds)")
    paired = [a for a in arms if a.paired.get(BASELINE) is not None and a.paired[BASELINE].n]
    for i, a in enumerate(paired):
        d = a.paired[BASELINE]
        if d.has_interval:
            paired_ax.errorbar(i, m.scale * d.mean, yerr=[[m.scale * (d.mean - d.low)], [m.scale * (d.high - d.mean)]],
                               fmt="o", color=colors[a.arm], capsize=4)
        else:  # one paired seed: a point with no interval (hollow)
            paired_ax.plot(i, m.scale * d.mean, "o", mfc="none", color=colors[a.arm])
        paired_ax.annotate(f"n={d.n}", (i, m.scale * d.mean), textcoords="offset points", xytext=(6, 0),
                           fontsize=7, va="center")
    paired_ax.axhline(0, color="black", lw=0.8)
    paired_ax.set_xticks(range(len(paired)), [a.arm for a in paired], rotation=35, ha="right")
    paired_ax.set_ylabel(f"Δ vs {BASELINE} ({m.unit})")
    paired_ax.set_title(f"paired Δ to {BASELINE}, same seeds (95% t interval)")
    fig.suptitle(exp.label)
    return fig


def _gamma(plt, exp, colors):
    """Mean |γ| per role over epochs: a panel per role, a line per arm."""
    roles = [r for r in ROLE_ORDER
             if any(r in (row.get("gamma_abs") or {}) for run in exp.runs for row in run.get("history") or [])]
    if not roles:
        return None
    fig, axes = plt.subplots(1, len(roles), figsize=(4 * len(roles), 3.6), squeeze=False)
    for ax, role in zip(axes[0], roles, strict=True):
        for a in exp.arms:
            x, y = _series(exp, a.arm, lambda row, r=role: (row.get("gamma_abs") or {}).get(r))
            if x:
                ax.plot(x, y, color=colors[a.arm], label=a.arm)
        ax.set_title(f"mean |γ|: {role}")
        ax.set_xlabel("epoch")
    legend(axes[0][0])
    return fig


def _effective_lr(plt, exp, colors):
    """lr/‖γ‖² of the scale-invariant γ, and lr/‖W‖² of the conv and linear weights."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for a in exp.arms:
        for ax, get in zip(axes, (lambda row: (row.get("gamma_eff_lr") or {}).get("scale_invariant"),
                                  lambda row: row.get("weight_eff_lr")), strict=True):
            x, y = _series(exp, a.arm, get)
            if x:
                ax.plot(x, y, color=colors[a.arm], label=a.arm)
    axes[0].set_title("lr / ‖γ‖², scale_invariant γ")
    axes[1].set_title("lr / ‖W‖², conv and linear weights")
    for ax in axes:
        _log_scale(ax)
        ax.set_xlabel("epoch")
    legend(axes[0])
    return fig


def _variance_ratio(plt, exp, colors):
    """var(branch)/var(skip) at the residual adds: mean over epochs, and per block at the end."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.8))
    ticks: list[str] = []
    for a in exp.arms:
        x, y = _series(exp, a.arm, mean_ratio)
        if x:
            axes[0].plot(x, y, color=colors[a.arm], label=a.arm)
        blocks, values = _final_blocks(exp, a.arm)
        if blocks:
            axes[1].plot(range(len(blocks)), values, color=colors[a.arm], marker=".", label=a.arm)
            ticks = blocks
    axes[0].set_title("mean var(branch)/var(skip) over residual adds")
    axes[0].set_xlabel("epoch")
    axes[1].set_title("var(branch)/var(skip) per block, last epoch")
    if ticks:
        axes[1].set_xticks(range(len(ticks)), ticks, rotation=90, fontsize=6)
    for ax in axes:
        _log_scale(ax)
    legend(axes[0])
    return fig


PLOTS = (
    ("accuracy", "metric per arm and paired differences with 95% intervals", _accuracy),
    ("gamma", "mean |γ| per role over epochs", _gamma),
    ("effective_lr", "effective learning rate over epochs", _effective_lr),
    ("variance_ratio", "variance ratio of residual branch to skip", _variance_ratio),
)


def _final_blocks(exp, arm: str) -> tuple[list[str], list[float]]:
    per_block: dict[str, list[float]] = {}
    for r in exp.runs:
        if r.get("arm") == arm and r.get("status") == "ok" and r.get("history"):
            for k, v in (r["history"][-1].get("variance_ratio") or {}).items():
                if isinstance(v, (int, float)) and v > 0:
                    per_block.setdefault(k, []).append(v)
    blocks = list(per_block)
    return blocks, [statistics.fmean(per_block[b]) for b in blocks]


def _log_scale(ax) -> None:
    """Log scale where the panel has positive data (a one-epoch run may have none)."""
    if any(len(line.get_ydata()) and min(line.get_ydata()) > 0 for line in ax.get_lines()):
        ax.set_yscale("log")

