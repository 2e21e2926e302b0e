"""The settings of a run: one config class per kind of task, its checks, and the learning-rate schedules.

A config holds every setting that defines a run; all of it is recorded with the result, and its
``key()`` (a hash of ``settings()``) names the run in results files and checkpoints. Numerics fields
left unset stay out of the key (``numerics.keyed_settings``), so older results keep their keys.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Callable

from ..errors import GammaGuideError
from ..policy import resolve_policy
from ..text_models import CLASSIFIERS, TRANSLATORS
from . import numerics
from .results import run_key
from .text_data import text_task

SCHEDULES = ("cosine", "onecycle")
TEXT_SCHEDULES = ("linear", "cosine")


@dataclass
class TrainConfig:
    """Every setting of an image run (SGD); all of it is recorded with the result."""

    model: str = "resnet20"
    data: str = "cifar10"
    policy: str = "guidelines"
    epochs: int = 15
    seed: int = 0
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    warmup_epochs: float = 0.0
    subset: int | None = None
    test_subset: int | None = None
    subset_seed: int = 0
    sync_bn: bool = False
    variance_batch: int = 256  # fixed, class-balanced test images for the variance ratios
    # Test images for the accuracy of every epoch but the last (a fixed, class-balanced part of
    # the test set; None: all of it). The last epoch, whose accuracy is the run's, always uses
    # the whole test set. Saves most of the evaluation time of long CPU runs.
    epoch_test_subset: int | None = None
    # Numerics (numerics.py): bf16 autocast or float32, channels_last or contiguous, CPU threads per
    # run. None: as before these fields existed (bf16 and channels_last on CUDA only, cores // jobs
    # threads), and left out of the key.
    precision: str | None = None
    memory_format: str | None = None
    threads: int | None = None

    def check(self) -> None:
        resolve_policy(self.policy)  # raises with the list of policies
        numerics.check(self)
        if self.schedule not in SCHEDULES:
            raise GammaGuideError(f"unknown --schedule {self.schedule!r}; use {' or '.join(SCHEDULES)}")
        check_counts(self, ("epochs", "batch_size"))
        check_non_negative(self, ("lr", "weight_decay", "momentum", "warmup_epochs"))

    def settings(self) -> dict[str, Any]:
        return numerics.keyed_settings(asdict(self))

    def key(self) -> str:
        return run_key(self.settings())


@dataclass
class TextConfig:
    """Every setting of a text run (AdamW); all of it is recorded with the result."""

    model: str = "textcls_preln"
    data: str = "sst2"
    policy: str = "guidelines"
    epochs: int = 3
    seed: int = 0
    batch_size: int = 64  # sentences (pairs) per step
    lr: float = 1e-3  # peak
    weight_decay: float = 0.01  # AdamW's decoupled decay, for what the policy decays
    beta2: float = 0.999
    schedule: str = "linear"
    warmup_epochs: float = 0.1
    label_smoothing: float = 0.0
    subset: int | None = None
    test_subset: int | None = None
    subset_seed: int = 0
    width: int = 128
    layers: int = 2
    heads: int = 4
    dropout: float = 0.1
    vocab_size: int = 8000
    max_len: int = 64  # tokens per sentence, special tokens included
    variance_batch: int = 256  # fixed test sentences for the variance ratios
    epoch_test_subset: int | None = None  # test sentences for the metric of every epoch but the last
    optimizer: str = "adamw"  # recorded so a reader knows the decay is decoupled; the only choice
    threads: int | None = None  # CPU threads of the run (numerics.py); None: cores // jobs, left out of the key

    @property
    def task(self) -> str:
        task = text_task(self.data)
        if task is None:
            raise GammaGuideError(f"{self.data!r} is not a text data spec; use sst2:PATH or multi30k:PATH")
        return task

    def check(self) -> None:
        resolve_policy(self.policy)
        task = self.task
        models = CLASSIFIERS if task == "classify" else TRANSLATORS
        if self.model not in models:
            raise GammaGuideError(f"--model {self.model!r} does not fit {self.data.partition(':')[0]} ({task}); "
                                  f"use {' or '.join(models)}")
        if self.schedule not in TEXT_SCHEDULES:
            raise GammaGuideError(f"unknown --schedule {self.schedule!r} for a text task; use "
                                  f"{' or '.join(TEXT_SCHEDULES)} (each after a linear warm-up)")
        if self.optimizer != "adamw":
            raise GammaGuideError(f"text tasks train with AdamW; got optimizer {self.optimizer!r}")
        check_counts(self, ("epochs", "batch_size", "width", "layers", "heads", "variance_batch"))
        numerics.check(self)
        if self.width % self.heads:
            raise GammaGuideError(f"--width {self.width} must be a multiple of --heads {self.heads}")
        check_non_negative(self, ("lr", "weight_decay", "warmup_epochs"))
        for name in ("beta2", "label_smoothing", "dropout"):
            value = getattr(self, name)
            if not 0 <= value < 1:
                raise GammaGuideError(f"--{name.replace('_', '-')} must be in [0, 1), got {value}")

    def settings(self) -> dict[str, Any]:
        return numerics.keyed_settings(asdict(self))

    def key(self) -> str:
        return run_key(self.settings())


def check_counts(cfg: Any, names: tuple[str, ...]) -> None:
    """Settings that count something (epochs, batch size, layers): at least 1, named as options."""
    for name in names:
        if getattr(cfg, name) < 1:
            raise GammaGuideError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}")


def check_non_negative(cfg: Any, names: tuple[str, ...]) -> None:
    """Rates and lengths (learning rate, weight decay, warm-up): finite and >= 0, named as options."""
    for name in names:
        value = getattr(cfg, name)
        if not math.isfinite(value) or value < 0:
            raise GammaGuideError(f"--{name.replace('_', '-')} must be a finite number >= 0, got {value}")


# ----------------------------------------------------------------------------- schedules


def lr_factor(step: int, total: int, schedule: str, warmup: int = 0) -> float:
    """Learning-rate multiplier at ``step`` of ``total``.

    cosine: optional linear warm-up, then half a cosine from 1 to 0.
    onecycle: linear from 1/25 to 1 over the first 30% of the steps, then a cosine to 1/25e4
    (the shape of ``torch.optim.lr_scheduler.OneCycleLR``, without its momentum cycling).
    """
    if schedule == "onecycle":
        up = max(1, int(0.3 * total))
        if step < up:
            return 1 / 25 + (1 - 1 / 25) * step / up
        t = (step - up) / max(1, total - up)
        low = 1 / 25e4
        return low + (1 - low) * 0.5 * (1 + math.cos(math.pi * t))
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


def text_lr_factor(step: int, total: int, schedule: str, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then a linear or cosine decay to 0."""
    if schedule == "cosine":
        return lr_factor(step, total, "cosine", warmup)
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, 1 - (step - warmup) / max(1, total - warmup))


def decay_time(factor: Callable[[int], float], lr: float, weight_decay: float, steps: int) -> float:
    """D = the sum over the first ``steps`` steps of lr_t * weight decay: how far L2 has acted (a weight
    decayed alone shrinks by about exp(-D)); below ~1 decay has barely acted."""
    return lr * weight_decay * math.fsum(factor(s) for s in range(steps))
