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

The measurement functions here (``squared_norms``, ``role_stats``, ``mean_eff_lr``,
``variance_ratios``) are also what the ablation harness records its mechanisms with
(``experiments/mechanisms.py``): one implementation.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import sys
import warnings
from dataclasses import asdict, dataclass, field
from numbers import Integral, Real
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import nn

from .analysis import build_report, residual_variances, trace_model
from .errors import GammaGuideError
from .groups import check_report
from .policy import resolve_policy
from .report import Report
from .roles import ROLES

__all__ = ["Monitor", "Record", "RoleStats", "WeightStats", "GroupStats", "MonitorWarning", "TensorBoardSink",
           "WandbSink", "LoggingSink", "JsonlSink", "read_jsonl", "squared_norms", "role_stats", "mean_eff_lr",
           "variance_ratios"]


class MonitorWarning(UserWarning):
    """A finding of ``Monitor`` that a person can act on (each is issued once)."""


# ----------------------------------------------------------------------------- measurements


def _local(p: torch.Tensor) -> torch.Tensor:
    """The part of ``p`` this process holds: a DTensor's (FSDP2) local shard, else ``p``."""
    to_local = getattr(p, "to_local", None)
    return to_local() if callable(to_local) else p


@torch.no_grad()
def squared_norms(params: Sequence[torch.Tensor], sharded: bool = False) -> list[float]:
    """‖p‖² of each parameter, in float32 (one device sync for all of them). ``sharded``: the
    parameters are FSDP shards; the shards' sums are added over the ranks (one all-reduce, a
    collective every rank must join), giving whole-parameter norms."""
    if not params:
        return []
    local = [_local(p).detach() for p in params]
    device = local[0].device
    sq = torch.stack([t.float().pow(2).sum().to(device) for t in local])
    if sharded:
        torch.distributed.all_reduce(sq)
    return sq.tolist()


@torch.no_grad()
def _mean_abs(params: Sequence[torch.Tensor], sharded: bool = False) -> float:
    """Mean |x| over every element of ``params`` together."""
    local = [_local(p).detach() for p in params]
    device = local[0].device
    if not sharded:
        return float(torch.cat([t.float().abs().flatten().to(device) for t in local]).mean())
    sums = torch.stack([torch.stack([t.float().abs().sum(), torch.tensor(float(t.numel()), device=t.device)]).to(device)
                        for t in local]).sum(0)
    torch.distributed.all_reduce(sums)
    total, count = sums.tolist()
    return total / count if count else float("nan")


def mean_eff_lr(params: Sequence[torch.Tensor], lr_of: Callable[[torch.Tensor], float],
                sq: Sequence[float] | None = None, sharded: bool = False) -> float:
    """Mean over ``params`` of lr/‖p‖², with ``lr_of(p)`` the learning rate its group steps it with
    and ``sq`` their ``squared_norms`` when already known."""
    if sq is None:
        sq = squared_norms(params, sharded)
    vals = [lr_of(p) / max(s, 1e-12) for p, s in zip(params, sq, strict=True)]
    return sum(vals) / len(vals)


def role_stats(gammas: Mapping[str, Sequence[torch.Tensor]], lr_of: Callable[[torch.Tensor], float],
               sharded: bool = False) -> dict[str, dict[str, float]]:
    """Per role (in the mapping's order): ``gamma_abs`` (mean |γ| over all elements of the role's γ),
    ``gamma_norm`` (mean over its γ vectors of ‖γ‖) and ``eff_lr`` (mean over its γ vectors of
    lr/‖γ‖², ``lr_of(γ)`` the learning rate its group steps it with)."""
    out = {}
    for role, ps in gammas.items():
        if not ps:
            continue
        sq = squared_norms(ps, sharded)
        out[role] = {
            "gamma_abs": _mean_abs(ps, sharded),
            "gamma_norm": sum(math.sqrt(s) for s in sq) / len(sq),
            "eff_lr": mean_eff_lr(ps, lr_of, sq),
        }
    return out


def variance_ratios(model: nn.Module, batch: Any) -> dict[str, float]:
    """var(branch) / var(skip) at each residual sum, from one traced forward pass on ``batch`` in
    eval mode (``residual_variances``), keyed by the module whose forward makes the sum (a second
    sum in one module gets a ' appended). The model's mode, BatchNorm statistics and everything
    else its forward stores are put back (``residual_variances``); so are the RNGs (Python's,
    NumPy's, torch's CPU and CUDA generators), and autocast is off for the pass."""
    with _rngs_kept(model), _no_autocast():
        found = residual_variances(model, batch)
    out: dict[str, float] = {}
    for rv in found:
        key = rv.module_name or "<model>"
        while key in out:  # two residual adds in one module (a transformer block)
            key += "'"
        out[key] = rv.ratio
    return out


@contextlib.contextmanager
def _rngs_kept(model: nn.Module) -> Iterator[None]:
    cuda = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    py = random.getstate()
    np_random = sys.modules.get("numpy.random")
    np_state = np_random.get_state() if np_random is not None else None
    try:
        with torch.random.fork_rng(devices=cuda):
            yield
    finally:
        random.setstate(py)
        if np_state is not None:
            np_random.set_state(np_state)


@contextlib.contextmanager
def _no_autocast() -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        for device in ("cpu", "cuda"):
            if device == "cuda" and not torch.cuda.is_available():
                continue
            stack.enter_context(torch.autocast(device, enabled=False))
        yield


# ----------------------------------------------------------------------------- records


@dataclass(frozen=True)
class RoleStats:
    """The γ of one role that the optimizer holds, at one step."""

    count: int  # γ vectors
    gamma_abs: float  # mean |γ| over all their elements
    gamma_norm: float  # mean over the vectors of ‖γ‖
    eff_lr: float  # mean over the vectors of lr/‖γ‖², lr: the rate its group steps it with now
    decayed: int  # how many the optimizer decays (weight_decay > 0 in their group)
    decay_time: float  # mean over the vectors of their group's Σ lr_t·λ so far


@dataclass(frozen=True)
class WeightStats:
    """The scale-invariant conv/linear weights (a normalization divides their scale out)."""

    count: int
    weight_norm: float  # mean ‖W‖
    eff_lr: float  # mean lr/‖W‖²
    decayed: int
    decay_time: float


@dataclass(frozen=True)
class GroupStats:
    """One optimizer parameter group at one step."""

    lr: float
    weight_decay: float
    decay_time: float  # Σ over the steps so far of lr_t·λ


@dataclass(frozen=True)
class Record:
    """What the monitor measured after optimizer step ``step`` (0: when it was attached)."""

    step: int
    roles: dict[str, RoleStats]
    weights: WeightStats | None  # None: no scale-invariant weight (transformers) or no trace
    variance: dict[str, float] = field(default_factory=dict)  # sum -> var(branch)/var(skip); {}: not probed
    groups: dict[str, GroupStats] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()  # the warnings first issued at this step

    def to_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "roles": {r: asdict(s) for r, s in self.roles.items()},
            "weights": None if self.weights is None else asdict(self.weights),
            "variance": dict(self.variance),
            "groups": {g: asdict(s) for g, s in self.groups.items()},
            "warnings": list(self.warnings),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Record":
        return cls(
            step=int(d["step"]),
            roles={r: RoleStats(**s) for r, s in (d.get("roles") or {}).items()},
            weights=None if not d.get("weights") else WeightStats(**d["weights"]),
            variance=dict(d.get("variance") or {}),
            groups={g: GroupStats(**s) for g, s in (d.get("groups") or {}).items()},
            warnings=tuple(d.get("warnings") or ()),
        )

    def scalars(self) -> dict[str, float]:
        """Flat ``{name: value}`` for a scalar logger: ``gamma_abs/residual_last``,
        ``eff_lr/scale_invariant``, ``weights/eff_lr``, ``variance/layer1.0``, ``decay_time/<group>``..."""
        out: dict[str, float] = {}
        for role, s in self.roles.items():
            out[f"gamma_abs/{role}"] = s.gamma_abs
            out[f"gamma_norm/{role}"] = s.gamma_norm
            out[f"eff_lr/{role}"] = s.eff_lr
        if self.weights is not None:
            out["weights/weight_norm"] = self.weights.weight_norm
            out["weights/eff_lr"] = self.weights.eff_lr
        finite = [v for v in self.variance.values() if math.isfinite(v)]
        for name, v in self.variance.items():
            out[f"variance/{name}"] = v
        if finite:
            out["variance/mean"] = sum(finite) / len(finite)
            out["variance/max"] = max(finite)
        for g, s in self.groups.items():
            out[f"decay_time/{g}"] = s.decay_time
        return out


def read_jsonl(path: str | os.PathLike) -> list[Record]:
    """The records of a monitor's JSONL file (``Monitor.to_jsonl`` or a ``JsonlSink``)."""
    p = Path(path)
    if not p.is_file():
        raise GammaGuideError(f"no monitor records at {str(p)!r}: pass the JSONL file that Monitor.to_jsonl() or "
                              f"its jsonl sink wrote")
    out = []
    for i, line in enumerate(p.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append(Record.from_dict(json.loads(line)))
        except (ValueError, KeyError, TypeError) as exc:
            raise GammaGuideError(f"{p}:{i} is not a monitor record ({type(exc).__name__}: {exc})") from None
    return out


# ----------------------------------------------------------------------------- sinks


class TensorBoardSink:
    """Every scalar of a record to a ``torch.utils.tensorboard.SummaryWriter`` (at the record's step)."""

    def __init__(self, writer: Any, prefix: str = "gammaguide"):
        self.writer, self.prefix = writer, prefix

    def write(self, record: Record) -> None:
        for k, v in record.scalars().items():
            self.writer.add_scalar(f"{self.prefix}/{k}", v, record.step)
        for w in record.warnings:
            self.writer.add_text(f"{self.prefix}/warnings", w, record.step)

    def flush(self) -> None:
        self.writer.flush()


class WandbSink:
    """Every scalar of a record to Weights & Biases: ``run.log`` (or ``wandb.log`` when ``run`` is
    None; wandb is imported only then). The monitor's step goes in as ``<prefix>/step``, not as
    W&B's step, which the training loop's own logging owns."""

    def __init__(self, run: Any = None, prefix: str = "gammaguide"):
        if run is None:
            try:
                import wandb
            except ImportError:
                raise GammaGuideError("WandbSink needs wandb: pip install wandb, or pass another sink") from None
            run = wandb
        self.run, self.prefix = run, prefix

    def write(self, record: Record) -> None:
        data = {f"{self.prefix}/{k}": v for k, v in record.scalars().items()}
        data[f"{self.prefix}/step"] = record.step
        self.run.log(data)


class LoggingSink:
    """One line per record to a ``logging.Logger`` (warnings at WARNING)."""

    def __init__(self, logger: logging.Logger | None = None, level: int = logging.INFO):
        self.logger, self.level = logger or logging.getLogger("gammaguide.monitor"), level

    def write(self, record: Record) -> None:
        parts = [f"|γ| {r} {s.gamma_abs:.3g}" for r, s in record.roles.items()]
        si = record.roles.get("scale_invariant")
        if si is not None:
            parts.append(f"eff_lr γ {si.eff_lr:.3g}")
        if record.weights is not None:
            parts.append(f"eff_lr W {record.weights.eff_lr:.3g}")
        finite = [v for v in record.variance.values() if math.isfinite(v)]
        if finite:
            parts.append(f"var(branch)/var(skip) mean {sum(finite) / len(finite):.3g} max {max(finite):.3g}")
        self.logger.log(self.level, "gammaguide step %d: %s", record.step, ", ".join(parts))
        for w in record.warnings:
            self.logger.warning("gammaguide: %s", w)


class JsonlSink:
    """Appends each record as one JSON line as it comes (a crashed run keeps what it recorded)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("")
        self._file = self.path.open("a")

    def write(self, record: Record) -> None:
        self._file.write(json.dumps(record.to_dict()) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class _FunctionSink:
    def __init__(self, fn: Callable[[Record], Any]):
        self.fn = fn

    def write(self, record: Record) -> None:
        self.fn(record)


def _as_sink(obj: Any) -> tuple[Any, bool]:
    """(sink, whether the monitor owns it and closes it)."""
    if isinstance(obj, (str, os.PathLike)):
        return JsonlSink(obj), True
    if callable(getattr(obj, "write", None)) and not hasattr(obj, "add_scalar"):
        return obj, False
    if callable(getattr(obj, "add_scalar", None)):
        return TensorBoardSink(obj), False
    if isinstance(obj, logging.Logger):
        return LoggingSink(obj), False
    if callable(getattr(obj, "log", None)):  # the wandb module or a wandb run
        return WandbSink(obj), False
    if callable(obj):
        return _FunctionSink(obj), False
    raise GammaGuideError(f"sinks: cannot send records to {type(obj).__name__} {obj!r}; pass a SummaryWriter, a "
                          f"logging.Logger, wandb (or a wandb run), a path for a JSONL file, a function of a "
                          f"Record, or an object with a write(record) method")


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
            sink, owned = _as_sink(s)
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
