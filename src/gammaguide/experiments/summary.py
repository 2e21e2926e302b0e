"""Results records grouped into settings, and each arm of a setting summarised.

A *setting* is everything a run was configured with except its arm (policy) and seed, plus the
metric its record names (``metric``, the key of its primary metric; ``test_acc`` when absent).
Within a setting each arm gets: its finished runs' metric per seed, its failures, mean and sd over
seeds, and its paired differences to ``no_gamma`` and ``all`` (see ``stats``).
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from .protocols import ARMS
from .stats import Difference, paired_difference

BASELINE, ALL, NO_NORM = "no_gamma", "all", "no_norm"
REFERENCES = (BASELINE, ALL)
ROLE_ORDER = ("residual_last", "scale_invariant", "shortcut", "stream", "head")
DEFAULT_METRIC = "test_acc"


@dataclass(frozen=True)
class Metric:
    """How a metric key is named and shown: ``scale`` turns a stored value into ``unit``."""

    key: str
    name: str  # "test accuracy"
    unit: str  # what a difference is counted in: "accuracy points"
    scale: float  # stored value x scale = shown value
    value_label: str  # the column of mean ± sd: "test accuracy %"


# Accuracy is stored as a fraction and shown in points; BLEU as sacrebleu's score (0-100), shown as is.
METRICS = {
    "test_acc": Metric("test_acc", "test accuracy", "accuracy points", 100.0, "test accuracy %"),
    "test_bleu": Metric("test_bleu", "test BLEU", "BLEU points", 1.0, "test BLEU"),
}


def metric_of(key: str) -> Metric:
    return METRICS.get(key) or Metric(key, key, f"{key} units", 1.0, key)


@dataclass
class ArmSummary:
    arm: str
    values: dict[int, float]  # seed -> final metric of a finished run
    failed: int  # runs that failed or finished without a finite metric value
    mean: float | None
    sd: float | None
    paired: dict[str, Difference] = field(default_factory=dict)  # reference arm -> arm - reference

    @property
    def n(self) -> int:
        return len(self.values)


@dataclass
class Experiment:
    """The runs of one setting (everything but arm and seed equal)."""

    label: str
    settings: dict[str, Any]
    metric: Metric
    runs: list[dict[str, Any]]
    arms: list[ArmSummary]
    sources: list[str] = field(default_factory=list)  # the results files its runs came from

    def arm(self, name: str) -> ArmSummary | None:
        return next((a for a in self.arms if a.arm == name), None)

    def difference(self, arm: str, reference: str) -> Difference | None:
        """The paired difference arm - reference; None when either arm has no run in this setting."""
        a, r = self.arm(arm), self.arm(reference)
        if a is None or r is None:
            return None
        return a.paired.get(reference) or paired_difference(a.values, r.values)


def metric_key(rec: dict[str, Any]) -> str:
    return rec.get("metric") or DEFAULT_METRIC


def _setting_key(rec: dict[str, Any]) -> str:
    s = dict(rec.get("settings") or {})
    s.pop("policy", None)
    s.pop("seed", None)
    return json.dumps({"settings": s, "metric": metric_key(rec)}, sort_keys=True)


def _arm_order(arms: Iterable[str]) -> list[str]:
    arms = set(arms)
    return [a for a in ARMS if a in arms] + sorted(arms - set(ARMS))


def _mean_sd(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def _value(rec: dict[str, Any], key: str) -> float | None:
    v = rec.get(key)
    if rec.get("status") != "ok" or isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


def _short_data(spec: str) -> str:
    """imagefolder:../shared/data/cifar10-jpeg -> cifar10-jpeg; sst2:PATH -> sst2; cifar10 -> cifar10."""
    kind, _, path = str(spec).partition(":")
    return (Path(path).name or kind) if kind == "imagefolder" and path else kind


def _sci(x: float) -> str:
    """5e-4, not 0.0005: weight decays read as powers of ten."""
    if x == 0:
        return "0"
    mantissa, exponent = f"{x:e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def setting_label(settings: dict[str, Any]) -> str:
    """model · data (subset) · epochs · weight decay: what tells the committed settings apart."""
    data = _short_data(settings.get("data", "?"))
    if settings.get("subset"):
        data += f" ({settings['subset']:,} train)"
    parts = [str(settings.get("model", "?")), data]
    if settings.get("epochs") is not None:
        parts.append(f"{settings['epochs']} epochs")
    if isinstance(settings.get("weight_decay"), (int, float)):
        parts.append(f"wd {_sci(settings['weight_decay'])}")
    return " · ".join(parts)


def summarize(records: list[dict[str, Any]], sources: list[str] | None = None) -> list[Experiment]:
    """Group records into experiments and summarise each arm. The last record of a
    (setting, arm, seed) wins, so a results file with a rerun counts that run once.
    ``sources`` (parallel to ``records``) names the file each record came from."""
    sources = list(sources) if sources is not None else [""] * len(records)
    groups: dict[str, dict[tuple[str, int], dict]] = {}
    files: dict[str, list[str]] = {}
    for rec, src in zip(records, sources, strict=True):
        if "arm" not in rec or "seed" not in rec:
            continue
        key = _setting_key(rec)
        groups.setdefault(key, {})[(rec["arm"], rec["seed"])] = rec
        if src and src not in files.setdefault(key, []):
            files[key].append(src)
    experiments = []
    for key, runs in groups.items():
        settings = json.loads(key)["settings"]
        metric = metric_of(json.loads(key)["metric"])
        values = {(a, s): _value(r, metric.key) for (a, s), r in runs.items()}
        per_arm: dict[str, dict[int, float]] = {}
        failed: dict[str, int] = {}
        for (a, s), v in sorted(values.items(), key=lambda kv: kv[0][1]):
            if v is None:
                failed[a] = failed.get(a, 0) + 1
            else:
                per_arm.setdefault(a, {})[s] = v
        arms = []
        for arm in _arm_order(a for a, _ in runs):
            vals = per_arm.get(arm, {})
            summary = ArmSummary(arm, vals, failed.get(arm, 0), *_mean_sd(list(vals.values())))
            for ref in REFERENCES:
                if ref != arm and any(a == ref for a, _ in runs):
                    summary.paired[ref] = paired_difference(vals, per_arm.get(ref, {}))
            arms.append(summary)
        experiments.append(Experiment(setting_label(settings), settings, metric, list(runs.values()), arms,
                                      files.get(key, [])))
    return experiments


def mean_ratio(row: dict[str, Any]) -> float | None:
    """The mean var(branch)/var(skip) over the residual adds of one history row."""
    vals = [v for v in (row.get("variance_ratio") or {}).values()
            if isinstance(v, (int, float)) and math.isfinite(v) and v > 0]
    return statistics.fmean(vals) if vals else None
