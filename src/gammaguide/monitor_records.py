"""``gg.Monitor``'s typed records, their JSONL form, and the sinks that send them elsewhere
(TensorBoard, W&B, Python logging, a JSONL file, a function)."""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from .errors import GammaGuideError

__all__ = ["Record", "RoleStats", "WeightStats", "GroupStats", "read_jsonl", "TensorBoardSink", "WandbSink",
           "LoggingSink", "JsonlSink", "as_sink"]


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


def as_sink(obj: Any) -> tuple[Any, bool]:
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
