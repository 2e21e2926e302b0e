"""What a task is: everything in which image classification, sentence classification and
translation differ, and nothing the training loop (``trainer.py``) does the same for all.

A task is a class. Its class attributes and class methods say what the command line and the grid
need before any training (its config class, data specs, options, protocols, arms); an instance,
made by ``Trainer`` for one run or one fused group, holds the data on the training device and
answers the loop's questions: the batches of an epoch, the model, the loss, the metrics and the
probe batch of the mechanisms. The registry of tasks is ``tasks.py``; how to add one is in
docs/harness.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterator

import torch

from .distributed import DistContext
from .numerics import Numerics
from .results import RunRecord


@dataclass(frozen=True)
class Option:
    """A command-line option that only some tasks take: ``--flag`` sets the config field ``field``.

    Given to a task that does not declare it, it is an error: ``refusal`` says why, or the task
    that declares it is named."""

    flag: str
    field: str
    type: Callable[[str], Any] | None
    help: str
    refusal: str | None = None
    store_true: bool = False
    choices: tuple[str, ...] | None = None


# One step of an epoch as a task yields it: the model's inputs (a tensor, or a tuple of tensors
# passed as positional arguments), the target, what the loss and accuracy average over (images,
# sentences or target tokens) and what the throughput counts (images or tokens).
Batch = tuple[Any, torch.Tensor, int, int]


class Task:
    """The interface; ``image_task.ImageClassification`` and ``text_task`` implement it."""

    label: ClassVar[str]  # "image", "sst2", "multi30k": the data a protocol of the task is for
    about: ClassVar[str]  # its models and data, for messages: "image models (--data cifar10, ...)"
    a_model: ClassVar[str]  # "an image model"
    config: ClassVar[type]  # its config class (config.py)
    record: ClassVar[type] = RunRecord  # its results line
    unit: ClassVar[str] = "images"  # what its throughput counts: train_<unit>_per_s, checkpoints' train_<unit>
    metric: ClassVar[str] = "test_acc"  # the history key of its primary metric
    noun: ClassVar[str] = "images"  # what its training set holds, for messages
    fusable: ClassVar[bool] = False  # a group of runs can train as one fused network (network.Fused)
    distributed: ClassVar[bool] = False  # a run may span torchrun processes (DistributedDataParallel)
    metrics_first: ClassVar[bool] = True  # key order of a history row: metrics before the throughput
    options: ClassVar[tuple[Option, ...]] = ()  # its own command-line options
    protocols: ClassVar[tuple[str, ...]] = ()  # its protocols (protocols.py), the first is the default
    optimizer_name: ClassVar[str] = "SGD"  # for the grid's first log line

    # -- before training: the command line and the grid ----------------------------------------------
    @classmethod
    def claims(cls, spec: str) -> bool:
        """Whether a data SPEC is this task's."""
        raise NotImplementedError

    @classmethod
    def default_config(cls, spec: str) -> Any:
        """The config of ``gammaguide train --data SPEC`` before the options are applied."""
        return cls.config(data=spec)

    @classmethod
    def adjust(cls, cfg: Any, args: Any) -> Any:
        """``cfg`` with the options the generic code does not know (``--depth``...) applied and checked."""
        return cfg

    @classmethod
    def load(cls, cfg: Any, data_dir: str | None = None, progress: bool = True) -> Any:
        """The dataset of ``cfg`` (decoded or tokenized once and cached)."""
        raise NotImplementedError

    @classmethod
    def default_arms(cls, cfg: Any, log: Callable[[str], None] | None = None) -> tuple[str, ...]:
        from .protocols import ARMS

        return ARMS

    # -- one run or one fused group -------------------------------------------------------------------
    def __init__(self, configs: list, data: Any, ctx: DistContext, numerics: Numerics, fused: bool):
        raise NotImplementedError

    n_train: int  # training examples of an epoch
    example: Any  # the input the policy's analysis traces
    lr_factor: Callable[[int, int, str, int], float]  # the schedule (config.py)

    def new_model(self, cfg: Any) -> torch.nn.Module:
        """A fresh model of ``cfg`` on the CPU (the trainer seeds the generator first)."""
        raise NotImplementedError

    def place(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model on the training device, in the memory format the run asks for."""
        return model.to(self.device)

    def optimizer(self, params: Any, cfg: Any, weight_decay: float) -> torch.optim.Optimizer:
        raise NotImplementedError

    def batches(self, epoch: int) -> Iterator[Batch]:
        """The steps of ``epoch``, drawn from the seed(s) and the epoch alone: the same for every arm."""
        raise NotImplementedError

    def loss(self, out: Any, target: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def correct(self, out: Any, target: torch.Tensor) -> torch.Tensor:
        """Right predictions of a step (a count, or one per run of a fused group)."""
        raise NotImplementedError

    def evaluate(self, network: Any, last: bool) -> list[dict[str, Any]]:
        """Each run's metrics for the history row (``last``: on the whole test set)."""
        raise NotImplementedError

    def probe(self) -> Any:
        """The fixed batch the variance ratios are measured on (the same for every arm and epoch)."""
        raise NotImplementedError

    def state(self) -> dict[str, Any]:
        """What a lone run's checkpoint holds for the task besides the loop's (text: the hypotheses)."""
        return {}

    def restore(self, state: dict[str, Any]) -> None:
        pass

    def notes(self) -> list[str]:
        """Lines for the log when a run ends (translation: the sacrebleu signature)."""
        return []

    def record_fields(self, ok: bool, final: float | None) -> dict[str, Any]:
        """The record's fields besides the loop's: the metric under its name, and the task's own."""
        return {"test_acc": final}
