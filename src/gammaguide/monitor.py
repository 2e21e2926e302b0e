"""``gg.Monitor``: the paper's two analyses, recorded live in any training loop.

    monitor = gg.Monitor(model, optimizer, example_inputs=x)   # the one added line

It hangs a step post-hook on the optimizer and, every ``every`` optimizer steps, records per
role of γ (``analyze``'s roles) the mean |γ|, the mean ‖γ‖ and the effective learning rate
lr/‖γ‖² (analysis 2 of the paper), the same for the scale-invariant conv/linear weights (those
whose output a normalization divides the scale out of), and the decay time Σ lr_t·λ of every
group; every ``probe_every`` steps also var(branch)/var(skip) at every residual sum on a fixed
probe batch (analysis 1). It reads parameters and runs the probe in eval mode with every piece
of state put back (mode, BatchNorm statistics, RNGs), so training is bit for bit what it would
have been without it (tests/test_monitor.py).

What it measures is in ``monitor_measures`` (plain functions, which the ablation harness records
its mechanisms with too); its records and sinks in ``monitor_records``. Both are re-exported here.
"""

from __future__ import annotations

import json
import math
import os
import sys
import warnings
from numbers import Integral, Real
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from .analysis import build_report, trace_model
from .errors import GammaGuideError
from .groups import check_report
from .monitor_measures import mean_eff_lr, role_stats, squared_norms, variance_ratios
from .monitor_records import (GroupStats, JsonlSink, LoggingSink, Record, RoleStats, TensorBoardSink, WandbSink,
                              WeightStats, as_sink, read_jsonl)
from .policy import resolve_policy
from .report import Report
from .roles import ROLES

__all__ = ["Monitor", "Record", "RoleStats", "WeightStats", "GroupStats", "MonitorWarning", "TensorBoardSink",
           "WandbSink", "LoggingSink", "JsonlSink", "read_jsonl", "squared_norms", "role_stats", "mean_eff_lr",
           "variance_ratios"]


class MonitorWarning(UserWarning):
    """A finding of ``Monitor`` that a person can act on (each is issued once)."""


# ----------------------------------------------------------------------------- the monitor


def _unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside Accelerate's ``AcceleratedOptimizer``, Lightning's
    ``LightningOptimizer`` and the like (their ``step`` calls its ``step``, which fires its hooks)."""
    opt, seen = optimizer, set()
    while not isinstance(opt, torch.optim.Optimizer) or type(opt).__name__ in ("AcceleratedOptimizer",
                                                                               "LightningOptimizer"):
        if id(opt) in seen:
            break
        seen.add(id(opt))
        inner = getattr(opt, "optimizer", None) or getattr(opt, "_optimizer", None)
        if inner is None:
            break
        opt = inner
    if not isinstance(opt, torch.optim.Optimizer):
        raise GammaGuideError(f"Monitor needs a torch.optim.Optimizer (or a wrapper holding one as .optimizer), got "
                              f"{type(optimizer).__name__}")
    return opt


def _sharded(model: nn.Module) -> bool:
    """Is any parameter an FSDP shard (FSDP1 ``use_orig_params=True`` or FSDP2 DTensor)?"""
    if "torch.distributed.fsdp" not in sys.modules:
        return False
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    return any(isinstance(m, (FullyShardedDataParallel, FSDPModule)) for m in model.modules())


def _rank() -> int:
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _check_count(what: str, value: Any, least: int) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral) or value < least:
        raise GammaGuideError(f"{what} must be a whole number >= {least}, got {value!r}")
    return int(value)


def _check_positive(what: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value) or value <= 0:
        raise GammaGuideError(f"{what} must be a finite number > 0, got {value!r}")
    return float(value)


def _some(names: Sequence[str], k: int = 4) -> str:
    return ", ".join(names[:k]) + (f" and {len(names) - k} more" if len(names) > k else "")


class Monitor:
    """Records the paper's two analyses while any loop trains ``model`` with ``optimizer``.

    ``example_inputs`` (a tensor, tuple or dict, as for ``analyze``) is traced once to find every
    γ's role and the scale-invariant weights, and is the default probe batch; ``report=`` reuses
    an analysis of this model instead (then pass ``probe=`` for the variance ratios, or image models
    are traced with their default input). ``every``: record every that many optimizer steps;
    ``probe_every``: measure the variance ratios every that many (default ``5 * every``; 0: never).
    ``sinks``: where each record also goes (a ``SummaryWriter``, wandb or a wandb run, a
    ``logging.Logger``, a path of a JSONL file, a function, or an object with ``write(record)``).

    Warnings (``MonitorWarning``, each once; thresholds below): a residual branch whose variance
    passed ``variance_limit`` times its skip's at a probe from ``late`` x ``total_steps`` on (at
    ``close()`` when ``total_steps`` is unknown); the effective learning rate of the scale-invariant
    weights at a fixed lr (1/‖W‖²) up or down ``eff_lr_factor``-fold since the first record; a
    ``stream`` or ``shortcut`` γ the optimizer decays.

    Under ``torch.distributed`` rank 0 records; other ranks only count steps, with no collective,
    except for FSDP-sharded models, where every rank joins one all-reduce per record (whole-parameter
    norms) and the probe's unsharding.
    """

    def __init__(self, model: nn.Module, optimizer: Any, example_inputs: Any = None, *, report: Report | None = None,
                 every: int = 100, probe: Any = None, probe_every: int | None = None, total_steps: int | None = None,
                 sinks: Sequence[Any] = (), warn: bool = True, variance_limit: float = 1.0, late: float = 0.5,
                 eff_lr_factor: float = 100.0):
        self.model = model
        self.optimizer = _unwrap_optimizer(optimizer)
        self.every = _check_count("every", every, 1)
        self.probe_every = 5 * self.every if probe_every is None else _check_count("probe_every", probe_every, 0)
        self.total_steps = None if total_steps is None else _check_count("total_steps", total_steps, 1)
        self.variance_limit = _check_positive("variance_limit", variance_limit)
        if isinstance(late, bool) or not isinstance(late, Real) or not 0 <= late <= 1:
            raise GammaGuideError(f"late must be a fraction of total_steps between 0 and 1, got {late!r}")
        self.late = float(late)
        self.eff_lr_factor = _check_positive("eff_lr_factor", eff_lr_factor)
        self.warn = bool(warn)
        self.step = 0
        self.history: list[Record] = []
        self.warnings: list[str] = []
        self._warned: set[tuple[str, str]] = set()
        self._sharded = _sharded(model)
        self._records = _rank() == 0  # this process keeps records
        self._measures = self._records or self._sharded  # this process measures (FSDP: every rank joins)
        self._probe = probe if probe is not None else example_inputs
        self._sinks, self._owned = [], []
        for s in sinks if self._records else ():  # other ranks send nothing (and open no file)
            sink, owned = as_sink(s)
            self._sinks.append(sink)
            if owned:
                self._owned.append(sink)

        inputs = example_inputs if example_inputs is not None else probe
        traced = None
        if report is None:
            traced = trace_model(model, inputs)
            report = build_report(traced, resolve_policy("guidelines"))
        else:
            check_report(report, model)
            try:
                traced = trace_model(model, inputs)
            except GammaGuideError as exc:
                self._notice("trace", "", f"no scale-invariant weights are recorded: the model could not be traced "
                                          f"without example inputs ({exc}); pass example_inputs= or probe=")
        if self._probe is None and self.probe_every:
            self._notice("probe", "", "no variance ratios are recorded: pass probe= (a batch of inputs) or "
                                      "example_inputs= to measure var(branch)/var(skip)")
        self.report = report

        params = dict(model.named_parameters())
        held = {id(p) for g in self.optimizer.param_groups for p in g["params"]}
        self._gammas: dict[str, list[nn.Parameter]] = {}
        self._gamma_names: dict[str, list[str]] = {}
        for e in report.entries:
            p = params.get(e.param_name)
            if p is not None and id(p) in held:
                self._gammas.setdefault(e.role, []).append(p)
                self._gamma_names.setdefault(e.role, []).append(e.param_name)
        self._gammas = {r: self._gammas[r] for r in ROLES if r in self._gammas}
        invariant = self._invariant_weights(traced)
        self._weights = [p for n, p in params.items() if id(p) in held and n in invariant]
        self._decay_time: list[Any] = []
        self._handle = self.optimizer.register_step_post_hook(self._after_step)
        self._closed = False
        self._inv_sq0: tuple[int, float] | None = None
        if self._measures:
            self.record(probe=bool(self.probe_every))

    # -- which weights are scale-invariant ---------------------------------------------------------
    def _invariant_weights(self, traced) -> set[str]:
        """Names (as ``model.named_parameters()`` gives them) of the conv/linear weights every walk
        from whose op ends at a normalization that divides their scale out: the walks of
        ``walks.py`` that give γ its role, started at the op that multiplies by the weight."""
        if traced is None or self.report is None:
            return set()
        kinds = {p.name: p.kind for p in self.report.params}
        inner = dict(traced.tree.named_parameters_all) if traced.tree is not None else dict(
            traced.inner.named_parameters())
        first: dict[int, str] = {}
        for name, p in inner.items():
            first.setdefault(id(p), name)
        uses, flow = traced.flow.uses(), traced.flow
        out = set()
        for name, p in self.model.named_parameters():
            traced_name = first.get(id(p), name)
            nodes = uses.get(traced_name, ())
            # Conv and linear weights: an embedding's rows are added to other embeddings (constants to
            # the walk, which it passes), so LN(c·E[x] + P) is not invariant to c.
            if kinds.get(name) != "weight" or not nodes or not all(
                    flow.flow.weighted[u] and "embedding" not in flow.flow.names[u] for u in nodes):
                continue
            events = [e.role for u in sorted(nodes) for e in flow.events(u)]
            if events and all(r == "scale_invariant" for r in events):
                out.add(name)
        return out

    # -- the hook ------------------------------------------------------------------------------
    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self.step += 1
        groups = optimizer.param_groups
        dt = self._decay_time
        if len(dt) < len(groups):
            dt.extend([0.0] * (len(groups) - len(dt)))
        for i, g in enumerate(groups):
            wd = g.get("weight_decay", 0.0)
            if wd:
                dt[i] = dt[i] + g["lr"] * wd  # stays a tensor (no sync) when lr is one
        step = self.step
        probe = bool(self.probe_every) and step % self.probe_every == 0
        if self._measures and (probe or step % self.every == 0):
            self.record(probe=probe)

    def record(self, probe: bool = True) -> Record | None:
        """Measure now (the hook calls this; call it yourself for a record at, say, the end of an
        epoch). ``probe``: also the variance ratios. Returns the record (None on ranks that do not
        record)."""
        if not self._measures:
            return None
        opt = self.optimizer
        groups = opt.param_groups
        if len(self._decay_time) < len(groups):
            self._decay_time.extend([0.0] * (len(groups) - len(self._decay_time)))
        labels = self._labels(groups)
        group_of = {id(p): i for i, g in enumerate(groups) for p in g["params"]}
        lrs = [float(g["lr"]) for g in groups]
        wds = [float(g.get("weight_decay", 0.0)) for g in groups]
        dts = [float(d) for d in self._decay_time[:len(groups)]]

        def lr_of(p: torch.Tensor) -> float:
            return lrs[group_of[id(p)]]

        def decay_facts(ps: Sequence[torch.Tensor]) -> tuple[int, float]:
            idx = [group_of[id(p)] for p in ps]
            return sum(wds[i] > 0 for i in idx), sum(dts[i] for i in idx) / len(idx)

        stats = role_stats(self._gammas, lr_of, self._sharded)
        roles = {}
        for role, s in stats.items():
            decayed, dt = decay_facts(self._gammas[role])
            roles[role] = RoleStats(len(self._gammas[role]), s["gamma_abs"], s["gamma_norm"], s["eff_lr"], decayed, dt)
        weights, inv_sq = None, None
        if self._weights:
            sq = squared_norms(self._weights, self._sharded)
            decayed, dt = decay_facts(self._weights)
            weights = WeightStats(len(self._weights), sum(math.sqrt(s) for s in sq) / len(sq),
                                  mean_eff_lr(self._weights, lr_of, sq), decayed, dt)
            # eff_lr at lr 1, for the warning: the schedule's own change of lr taken out.
            inv_sq = mean_eff_lr(self._weights, lambda p: 1.0, sq)
        variance = {}
        if probe and self._probe is not None:
            variance = variance_ratios(self.model, self._probe)
        if not self._records:
            return None
        rec = Record(self.step, roles, weights, variance,
                     {lab: GroupStats(lrs[i], wds[i], dts[i]) for i, lab in enumerate(labels)})
        new = self._check(rec, groups, group_of, inv_sq)
        if new:
            rec = Record(rec.step, rec.roles, rec.weights, rec.variance, rec.groups, tuple(new))
        self.history.append(rec)
        for sink in self._sinks:
            sink.write(rec)
        return rec

    @staticmethod
    def _labels(groups: Sequence[dict]) -> list[str]:
        labels: list[str] = []
        for i, g in enumerate(groups):
            label = str(g.get("name") or f"group{i}")
            if label in labels:
                label = f"{label}.{i}"
            labels.append(label)
        return labels

    # -- warnings ------------------------------------------------------------------------------
    def _notice(self, kind: str, key: str, message: str) -> bool:
        if (kind, key) in self._warned:
            return False
        self._warned.add((kind, key))
        self.warnings.append(message)
        if self.warn:
            warnings.warn(message, MonitorWarning, stacklevel=2)
        return True

    def _check(self, rec: Record, groups: Sequence[dict], group_of: dict[int, int],
               inv_sq: float | None) -> list[str]:
        before = len(self.warnings)
        # Groups that ignore the guidelines: a γ that scales the skip path, decayed.
        for role, paper in (("stream", "γ_first"), ("shortcut", "γ_down")):
            decayed = [(n, groups[group_of[id(p)]].get("weight_decay", 0.0))
                       for n, p in zip(self._gamma_names.get(role, ()), self._gammas.get(role, ()), strict=True)
                       if groups[group_of[id(p)]].get("weight_decay", 0.0)]
            fresh = [(n, wd) for n, wd in decayed if ("decayed", n) not in self._warned]
            if fresh:
                for n, _ in fresh:
                    self._warned.add(("decayed", n))
                names = [n for n, _ in fresh]
                self._notice("decayed-role", f"{role}:{','.join(names)}",
                             f"the optimizer decays {len(names)} {role} γ ({paper}: it scales the skip path itself), "
                             f"weight_decay {fresh[0][1]:g}: {_some(names)}. The guidelines do not decay them; build "
                             f"the groups with gammaguide.param_groups(model, weight_decay, example_inputs).")
        # Analysis 2: ‖W‖² of the scale-invariant weights moved eff_lr_factor-fold since the start.
        if inv_sq is not None:
            if self._inv_sq0 is None:
                self._inv_sq0 = (rec.step, inv_sq)
            step0, inv0 = self._inv_sq0
            factor = inv_sq / inv0
            if factor >= self.eff_lr_factor or factor <= 1 / self.eff_lr_factor:
                up = factor > 1
                self._notice(
                    "eff_lr", "up" if up else "down",
                    f"the effective learning rate lr/‖W‖² of the {rec.weights.count} scale-invariant weights has "
                    f"{'risen' if up else 'fallen'} {max(factor, 1 / factor):.0f}-fold at a fixed lr between steps "
                    f"{step0} and {rec.step} (‖W‖² {'shrank' if up else 'grew'} that much): weight decay is too "
                    f"{'strong' if up else 'weak'} for this learning rate; {'lower' if up else 'raise'} weight_decay "
                    f"(or {'raise' if up else 'lower'} lr). (Monitor(eff_lr_factor=...) sets the factor, now "
                    f"{self.eff_lr_factor:g}.)")
        # Analysis 1: late in training, a branch that adds more variance than its skip carries.
        if rec.variance and self.total_steps is not None and rec.step >= self.late * self.total_steps:
            self._check_variance(rec, groups)
        return self.warnings[before:]

    def _check_variance(self, rec: Record, groups: Sequence[dict]) -> None:
        """Late in training: a sum whose var(branch)/var(skip) is over ``variance_limit`` and above
        its value at the first probe (a block that starts far from the identity, as ResNet-20's first
        does with every γ at 1, is not news; one that grew there is)."""
        first = next((r.variance for r in self.history if r.variance), rec.variance)
        decays = {id(p) for g in groups if g.get("weight_decay", 0.0) for p in g["params"]}
        for name, ratio in rec.variance.items():
            start = first.get(name, float("nan"))
            if not (math.isfinite(ratio) and ratio > self.variance_limit and not ratio <= start):
                continue
            module = name.rstrip("'")

            def inside(role: str, module: str = module) -> list[tuple[str, bool]]:
                return [(n, id(p) in decays) for n, p in zip(self._gamma_names.get(role, ()),
                                                             self._gammas.get(role, ()), strict=True)
                        if module == "<model>" or n.startswith(module + ".")]

            said = ""
            last, shortcut = inside("residual_last"), inside("shortcut")
            if last:
                decayed = [n for n, d in last if d]
                said += (f" L2 on its γ_last ({_some([n for n, _ in last])}) keeps the branch small; the optimizer "
                         + (f"decays {_some(decayed)}." if decayed else "decays none of them."))
            decayed = [n for n, d in shortcut if d]
            if decayed:
                said += f" The optimizer decays its shortcut γ ({_some(decayed)}), which shrinks the skip."
            self._notice("variance", name,
                         f"residual sum '{name}': var(branch)/var(skip) = {ratio:.3g} at step {rec.step} "
                         f"({start:.3g} at the first probe), over {self.variance_limit:g}: late in training its "
                         f"branch adds more variance than the skip carries, so the block is no longer near the "
                         f"identity.{said} (Monitor(variance_limit=..., late=...) set the threshold and from when "
                         f"it applies.)")

    # -- output and teardown ---------------------------------------------------------------------
    def to_jsonl(self, path: str | os.PathLike) -> Path:
        """Write every record, one JSON object a line (``Record.to_dict()``); returns the path."""
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("".join(json.dumps(r.to_dict()) + "\n" for r in self.history))
        return p

    def close(self) -> None:
        """Detach from the optimizer; without ``total_steps``, check the last probe's variance
        ratios now (the end of training is late). Sinks made from paths are closed, others flushed."""
        if self._closed:
            return
        self._closed = True
        self._handle.remove()
        if self.total_steps is None:
            probed = [r for r in self.history if r.variance and r.step > 0]
            if probed:
                before = len(self.warnings)
                self._check_variance(probed[-1], self.optimizer.param_groups)
                for sink in self._sinks:
                    if isinstance(sink, LoggingSink):
                        for w in self.warnings[before:]:
                            sink.logger.warning("gammaguide: %s", w)
        for sink in self._sinks:
            if sink in self._owned:
                sink.close()
            elif callable(getattr(sink, "flush", None)):
                sink.flush()

    def __enter__(self) -> "Monitor":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"Monitor(step={self.step}, every={self.every}, probe_every={self.probe_every}, "
                f"records={len(self.history)}, roles={list(self._gammas)}, "
                f"scale_invariant_weights={len(self._weights)})")
